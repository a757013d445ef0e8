"""The "IDs from images" sub-tab (where the seed has it): drop generated PNGs, get the merge recipe of the first one
that carries one back into the Merge tab's controls (`image_recipe` reads Block Merger's and SuperMerger's
infotexts). Every dropped image gets a line saying what was found in it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image, UnidentifiedImageError

from ..core.errors import MergeError
from .image_recipe import ImageRecipe, recipe_of_image


def _path_of(item: Any) -> Path:
    """A gr.File value (a tempfile wrapper in gradio 3, a path in gradio 4) as a path."""
    return Path(getattr(item, "name", item))


def read_image_info(path: Path) -> dict:
    try:
        with Image.open(path) as image:
            return dict(image.info)
    except (OSError, UnidentifiedImageError) as e:
        raise MergeError(f"{path.name} cannot be opened as an image ({e}).") from e


def recipes_of_files(paths: list[Path], supermerger_history: str = "", model_names=(),
                     ) -> tuple[ImageRecipe | None, list[str]]:
    """(the first recipe found, one message line per image)."""
    if not paths:
        raise MergeError("Drop one or more PNG images generated with a merge.")
    history = Path(supermerger_history.strip()) if (supermerger_history or "").strip() else None
    first, lines = None, []
    for path in paths:
        name = path.name
        try:
            found = recipe_of_image(read_image_info(path), history, model_names)
        except MergeError as e:
            lines.append(f"{name}: {e}")
            continue
        notes = "".join(f" {n}" for n in found.notes)
        if first is None:
            first = found
            lines.append(f"{name}: loaded {found.source} into the Merge tab.{notes}")
        else:
            lines.append(f"{name}: {found.source} (not loaded: the first image's recipe was).{notes}")
    return first, lines


def build_images_tab(h, settings_updates, settings_outputs: list, current_sliders: list, error_message) -> None:
    """The sub-tab; `settings_updates(h, values, current_sliders)` gives the updates of `settings_outputs` (the
    Merge tab's recipe widgets and sliders) for a recipe's widget values."""
    host = h.host
    default_history = getattr(host, "supermerger_history", lambda: None)()
    files = gr.File(label="Generated PNG images", file_count="multiple", file_types=["image"],
                    elem_id="bm_img_files")
    history = gr.Textbox(str(default_history or ""), max_lines=1, elem_id="bm_img_sm_history",
                         label="SuperMerger's mergehistory.csv (for images made by SuperMerger, which record only "
                               "a merge ID)")
    message = gr.Textbox(label="Found", lines=3, max_lines=20, interactive=False, elem_id="bm_img_message")

    def dropped(items, history_path, *current):
        skip = [gr.update()] * len(settings_outputs)
        try:
            paths = [_path_of(i) for i in (items if isinstance(items, list) else [items] if items else [])]
            found, lines = recipes_of_files(paths, history_path, host.list_models())
            if found is None:
                return [*skip, "\n".join(lines)]
            return [*settings_updates(h, found.values, current), "\n".join(lines)]
        except Exception as e:  # noqa: BLE001 - every failure becomes the message, the controls stay
            return [*skip, error_message(e)]

    files.upload(dropped, [files, history, *current_sliders], [*settings_outputs, message])
