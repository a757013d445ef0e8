"""LoRA tools: read LoRA/LyCORIS files, map their modules to checkpoint keys, bake, combine and extract.

Plain Python over torch and safetensors, like `core/`; nothing here imports the WebUI.
"""
