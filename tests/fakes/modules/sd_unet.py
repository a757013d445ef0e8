"""modules.sd_unet: UNet replacements (TensorRT and the like); the fake records every apply_unet call."""

calls = []
current_unet = None


def apply_unet(option=None):
    calls.append(option)
