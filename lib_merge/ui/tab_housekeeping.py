"""The Merge tab's "Advanced" accordion (the seed's): the cache of open models (what it holds, clear it), and
moving the loaded model out of VRAM and back (the WebUI's own "Unload SD checkpoint to RAM" / "Load SD checkpoint
to VRAM"; the merge stays in the model). The per-key ratio log is the "log ratios" save setting."""

from __future__ import annotations

import gradio as gr


def open_models_text(service) -> str:
    names = service.open_model_names()
    return ("Open models (kept for the next merges): " + ", ".join(names)) if names else "No model is open."


def build_housekeeping(h, error_message) -> None:
    service, host = h.service, h.host
    movable = hasattr(host, "unload_model") and not host.live_model_unavailable
    with gr.Accordion("Advanced", open=False, elem_id="bm_advanced_acc"):
        cache = gr.Textbox(open_models_text(service), label="Cache of open models", max_lines=3,
                           interactive=False, elem_id="bm_cache")
        with gr.Row():
            refresh = gr.Button("Reload cache list", size="sm", elem_id="bm_cache_list")
            clear = gr.Button("Clear cache", size="sm", elem_id="bm_cache_clear")
            unload = gr.Button("Unload model to RAM", size="sm", elem_id="bm_unload", interactive=movable)
            load = gr.Button("Load model to VRAM", size="sm", elem_id="bm_to_vram", interactive=movable)
        note = gr.Markdown("", elem_id="bm_advanced_note")

    def guarded(action):
        def run():
            try:
                with host.lock():
                    message = action()
            except Exception as e:  # noqa: BLE001 - every failure becomes the note
                message = error_message(e)
            return open_models_text(service), message
        return run

    def cleared():
        return f"Closed {service.close()} open model(s); the next merge opens its models again."

    def unloaded():
        host.unload_model()
        return "Moved the model (and the merge in it) to RAM: its VRAM is free. \"Load model to VRAM\" takes it back."

    def loaded():
        host.model_to_device()
        return "Moved the model back to its device."

    refresh.click(guarded(lambda: ""), None, [cache, note], queue=False)
    clear.click(guarded(cleared), None, [cache, note])
    unload.click(guarded(unloaded), None, [cache, note])
    load.click(guarded(loaded), None, [cache, note])
