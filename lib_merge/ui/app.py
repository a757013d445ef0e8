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
CSS = "#bm_inspect_out textarea, #bm_message textarea {font-family: ui-monospace, monospace; font-size: 13px}"


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

    from .tab import TITLE, build_tab

    tab = build_tab(service)
    # System fonts only: the default theme would fetch its web font from the internet.
    theme = gr.themes.Default(font=FONTS, font_mono=MONO)
    with gr.Blocks(title=TITLE, analytics_enabled=False, theme=theme, css=CSS) as app:
        gr.Markdown(f"## {TITLE} — models in `{service.host.models_folder()}`", elem_id="bm_app_title")
        tab.render()
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
