"""The standalone app: the WebUI tab (`ui.build_tab`, the same code) served on 127.0.0.1 over a folder of models.

Without the WebUI no model is loaded, so "Merge" (load into the running model) and generation are shown as
unavailable with their reason; "Merge to file", history, presets, the chart and "Inspect" work.
"""

from __future__ import annotations

import os
from pathlib import Path

# no usage statistics or update checks: the app must work with the network closed
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

HOST = "127.0.0.1"
DEFAULT_PORT = 7870
FONTS = ["ui-sans-serif", "system-ui", "Segoe UI", "Helvetica", "Arial", "sans-serif"]
MONO = ["ui-monospace", "Consolas", "DejaVu Sans Mono", "monospace"]
#: the extension's front-end files, which the WebUI loads from the extension's top level by itself
EXTENSION_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = EXTENSION_ROOT / "javascript" / "block_merger.js"
STYLE = EXTENSION_ROOT / "style.css"


def build_service(models: Path, data_dir: Path | None = None):
    from ..hosts.standalone import StandaloneHost
    from ..io.hashes import HashCache
    from ..service.merge_service import MergeService

    host = StandaloneHost(Path(models), data_dir)
    data = host.data_dir
    return MergeService(host, hashes=HashCache(data / "hashes.json"))


def build_app(service):
    """The tab inside a page of its own (rendered into an outer Blocks, as the WebUI does with extension tabs)."""
    import gradio as gr

    from .tab import ROOT_ID, TITLE, build_tab, js_event

    tab = build_tab(service)
    # System fonts only: the default theme would fetch its web font from the internet.
    theme = gr.themes.Default(font=FONTS, font_mono=MONO)
    with gr.Blocks(title=TITLE, analytics_enabled=False, theme=theme, css=STYLE.read_text(encoding="utf-8")) as app:
        gr.Markdown(f"## {TITLE} — models in `{service.host.models_folder()}`", elem_id="bm_app_title")
        with gr.Column(elem_id=ROOT_ID):  # the WebUI's tab container has this id: style.css and the script use it
            tab.render()
        # the page script runs once the page has loaded (gradio 3.41 has no `head`; gradio 4 keeps `load` + js)
        app.load(None, None, None, **js_event("() => {\n" + SCRIPT.read_text(encoding="utf-8") + "\n}"))
    return app


def serve(models: Path, port: int = DEFAULT_PORT, data_dir: Path | None = None, block: bool = True,
          open_browser: bool = False):
    """Build and launch the app; with block=False, return the running app (close it with `app.close()`)."""
    models = Path(models)
    if not models.is_dir():
        from ..core.errors import MergeError

        raise MergeError(f"Models folder {models} does not exist.")
    data = Path(data_dir) if data_dir else None
    if data is not None:
        data.mkdir(parents=True, exist_ok=True)
    app = build_app(build_service(models, data))
    app.queue()
    app.launch(server_name=HOST, server_port=port, inbrowser=open_browser, prevent_thread_lock=not block,
               show_api=False, quiet=not block)
    return app
