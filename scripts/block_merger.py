"""Block Merger's entry script for the AUTOMATIC1111 WebUI and Forge: registration only (the work is in lib_merge).

The WebUI executes this file with the extension root on sys.path only while it runs, so `lib_merge` is imported
here, at the top; its submodules resolve later through the package. One `Extension` (and so one MergeService,
created on first use) serves the tab, the txt2img script, X/Y/Z and the API; its host is Forge's when the running
WebUI has Forge's model loader (a capability probe), else A1111's.
"""

from pathlib import Path

from modules import script_callbacks, scripts

import lib_merge  # noqa: F401  (import while the extension root is on sys.path)
from lib_merge.hosts.a1111 import INFOTEXT_RECIPE, TAB, TITLE, A1111Host, Extension
from lib_merge.hosts.forge import ForgeHost, is_forge

EXTENSION = Extension(Path(__file__).resolve().parents[1], ForgeHost if is_forge() else A1111Host)


def on_ui_tabs():
    from lib_merge.ui.tab import build_tab  # loaded on demand (lib_merge is already imported)

    return [(build_tab(EXTENSION.service()), *TAB)]


def on_app_started(demo, app):
    """REST routes, served only with the WebUI's API on and behind its `--api-auth`, like /sdapi/v1/*."""
    EXTENSION.add_api_routes(app)


class BlockMergerScript(scripts.Script):
    """txt2img, the API's alwayson_scripts and X/Y/Z can ask for a merge: its recipe JSON is merged and loaded before
    the generation (only when it differs from the merge already loaded); a generation without one gets the user's
    own choice back (their merge from the tab or API, or the base). Runs under the generation's lock."""

    def title(self):
        return TITLE

    def show(self, is_img2img):
        return False if is_img2img else scripts.AlwaysVisible

    def ui(self, is_img2img):
        import gradio as gr

        with gr.Accordion("Block Merger", open=False):
            recipe = gr.Textbox(label="Merge recipe (JSON; empty: keep the loaded model)", lines=1, value="",
                                elem_id=self.elem_id("recipe"))
        self.infotext_fields = [(recipe, lambda params: params.get(INFOTEXT_RECIPE, ""))]
        return [recipe]

    def before_process(self, p, recipe="", *args):
        EXTENSION.before_process(p, recipe)


EXTENSION.register_xyz_axes()  # the built-in xyz_grid script is loaded before extensions
script_callbacks.on_before_ui(EXTENSION.register_xyz_axes)
script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_ui_settings(EXTENSION.add_settings)
script_callbacks.on_app_started(on_app_started)
script_callbacks.on_model_loaded(EXTENSION.model_loaded)
script_callbacks.on_script_unloaded(EXTENSION.close)
