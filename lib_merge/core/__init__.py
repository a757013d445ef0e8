"""The merge engine: plain Python over torch tensors, with no knowledge of the WebUI or of gradio."""
