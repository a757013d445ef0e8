"""modules.images: save_image (PNG with the infotext in the "parameters" chunk) and image_grid."""

import math
import os

from PIL import Image, PngImagePlugin

saved = []  # fake-only: (path, info) of every saved image


def image_grid(imgs, batch_size=1, rows=None):
    if rows is None:
        rows = int(math.sqrt(len(imgs))) or 1
    cols = math.ceil(len(imgs) / rows)
    w, h = imgs[0].size
    grid = Image.new("RGB", size=(cols * w, rows * h), color="black")
    for i, img in enumerate(imgs):
        grid.paste(img, box=(i % cols * w, i // cols * h))
    return grid


def get_next_sequence_number(path, basename):
    existing = [f for f in os.listdir(path) if f.startswith(basename)] if os.path.isdir(path) else []
    return len(existing)


def save_image(image, path, basename, seed=None, prompt=None, extension="png", info=None, short_filename=False,
               no_prompt=False, grid=False, pnginfo_section_name="parameters", p=None, existing_info=None,
               forced_filename=None, suffix="", save_to_dirs=None):
    os.makedirs(path, exist_ok=True)
    if forced_filename is None:
        number = get_next_sequence_number(path, basename)
        decoration = "" if short_filename or seed is None else f"-{seed}"
        prefix = f"{basename}-" if basename else ""
        fullfn = os.path.join(path, f"{prefix}{number:05}{decoration}{suffix}.{extension}")
    else:
        fullfn = os.path.join(path, f"{forced_filename}.{extension}")
    pnginfo = PngImagePlugin.PngInfo()
    if info is not None:
        pnginfo.add_text(pnginfo_section_name, info)
    image.save(fullfn, pnginfo=pnginfo)
    saved.append((fullfn, info, grid))
    return fullfn, None


def read_info_from_image(image):
    return image.info.get("parameters"), {}

