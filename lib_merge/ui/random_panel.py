"""The Merge tab's random merges ("Let the Dice roll", Run Rand), plot helpers (Set X/Y, reservation queue, saved
plot presets) and the compact editor of the 110 extended SDXL weights.

`PlotTools` holds the handlers (testable without gradio's events; the queue lives here, one per tab). `Panels`
builds the widgets at three places of the Merge tab and wires them once the tab's own outputs exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gradio as gr

from ..core.arch import BLOCKS_XL, BLOCKS_XL_FINE, xl_group
from ..core.errors import MergeError
from ..core.random_weights import RANDOM_MODES, TARGETS, RandomSpec, apply, spec_from_dict
from ..io.plot_presets import FIELDS, PlotPresets
from . import dice_extras
from . import values as uv
from .chart import weights_svg
from .plot_queue import HEADERS, PlotQueue

#: the dice widgets, in the order handlers receive them
DICE_KEYS = ("rand_mode", "rand_targets", "rand_extend", "rand_seed", "rand_round", "rand_count", "rand_template",
             "rand_upper", "rand_lower", "rand_clamp_upper", "rand_clamp_lower", dice_extras.SAVE_ELIST)
DICE_DEFAULTS = dict(rand_mode="R", rand_targets=["alpha"], rand_extend=False, rand_seed=-1, rand_round=3,
                     rand_count=4, rand_template="", rand_upper="1", rand_lower="0", rand_clamp_upper="",
                     rand_clamp_lower="", **{dice_extras.SAVE_ELIST: False})
USER_PLOT_PRESETS = "block_merger_xyz_presets.json"
PLOT_QUEUE_FILE = "block_merger_plot_queue.json"
MAX_RUN_RAND = 100


def spec_from_values(dice: dict[str, Any]) -> RandomSpec:
    """The dice widgets -> a checked RandomSpec."""
    try:
        decimals = int(dice.get("rand_round") if dice.get("rand_round") not in (None, "") else 3)
    except (TypeError, ValueError):
        raise MergeError(f"Round must be a whole number of decimals, not {dice.get('rand_round')!r}.") from None
    targets = tuple(dice.get("rand_targets") or ())
    return RandomSpec(str(dice.get("rand_mode") or "R"), str(dice.get("rand_template") or ""),
                      str(dice.get("rand_upper") or "1"), str(dice.get("rand_lower") or "0"),
                      str(dice.get("rand_clamp_upper") or ""), str(dice.get("rand_clamp_lower") or ""), decimals,
                      targets, bool(dice.get("rand_extend"))).check()


def _whole(value: Any, name: str, low: int, high: int) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MergeError(f"{name} must be a whole number, not {value!r:.40}.") from None
    if number != int(number) or not low <= number <= high:
        raise MergeError(f"{name} must be a whole number from {low} to {high}; got {value!r:.40}.")
    return int(number)


def run_rand_axis(dice: dict[str, Any]) -> str:
    """The "random" axis text of a Run Rand: N fresh seeds (seed -1), or seed, seed+1, ... (a repeatable set)."""
    count = _whole(dice.get("rand_count"), "Num of cells", 1, MAX_RUN_RAND)
    seed = _whole(dice.get("rand_seed", -1), "The weight seed", -1, 2**32 - 1)
    if seed == -1:
        return str(count)
    if seed + count > 2**32:
        raise MergeError(f"The weight seed {seed} + {count} cells passes {2**32 - 1}; choose a smaller seed.")
    return ", ".join(f"#{seed + i}" for i in range(count))


def set_axis(kind: str, text: str, weights: str, new_kind: str = "mbw alpha") -> tuple[str, str]:
    """↑ Set X / Set Y: the weights line appended to an "mbw" axis's values, or an axis of another type becomes
    `new_kind` with that line alone."""
    weights = (weights or "").strip()
    if not weights:
        raise MergeError("The weights field is empty: nothing to copy to the axis.")
    if not (kind or "").startswith("mbw"):
        return new_kind, weights
    lines = [line for line in (text or "").splitlines() if line.strip()]
    return kind, "\n".join([*lines, weights])


# -- the 110 extended SDXL weights ----------------------------------------------------------------------------


def groups() -> dict[str, list[str]]:
    """The fine labels of each of the 20 SDXL blocks, in weight order."""
    out: dict[str, list[str]] = {block: [] for block in BLOCKS_XL}
    for label in BLOCKS_XL_FINE:
        out[xl_group(label)].append(label)
    return out


def expand_to_fine(text: str) -> str:
    """20 (or 26) block weights -> 110 fine ones: every fine block takes its block's value."""
    tokens = uv.weight_tokens(text)
    if len(tokens) == 26:
        tokens = [tokens[i] for i in uv.XL_POSITIONS]
    if len(tokens) != 20:
        raise MergeError(f"Give 20 SDXL (or 26) block weights to expand; the field has {len(tokens)}.")
    by_block = dict(zip(BLOCKS_XL, tokens, strict=True))
    return ",".join(by_block[xl_group(label)] for label in BLOCKS_XL_FINE)


def group_texts(text: str) -> list[str] | None:
    """110 values -> one text per SDXL block (its fine values, in order); None unless 110 values are given."""
    tokens = uv.weight_tokens(text)
    if len(tokens) != len(BLOCKS_XL_FINE):
        return None
    value = dict(zip(BLOCKS_XL_FINE, tokens, strict=True))
    return [",".join(value[label] for label in labels) for labels in groups().values()]


def join_groups(texts: Sequence[str], current: str) -> str:
    """One text per SDXL block -> the 110 values (a group with the wrong count keeps the current values)."""
    value = dict(zip(BLOCKS_XL_FINE, uv.weight_tokens(current), strict=False))
    for (block, labels), text in zip(groups().items(), texts, strict=True):
        tokens = uv.weight_tokens(text)
        if len(tokens) != len(labels):
            raise MergeError(f"{block} takes {len(labels)} values ({', '.join(labels)}); got {len(tokens)}.")
        value.update(zip(labels, tokens, strict=True))
    missing = [label for label in BLOCKS_XL_FINE if label not in value]
    if missing:
        raise MergeError("Fill every block's values (or press 'From block weights' first).")
    return ",".join(value[label] for label in BLOCKS_XL_FINE)


# -- handlers -------------------------------------------------------------------------------------------------


class PlotTools:
    """Run Rand, a single random merge, the reservation queue and plot presets, over the tab's `Handlers`."""

    def __init__(self, handlers):
        self.h = handlers
        self.queue = PlotQueue(handlers.host.history_path().with_name(PLOT_QUEUE_FILE))
        self.presets = PlotPresets(handlers.host.history_path().with_name(USER_PLOT_PRESETS))

    def run_rand(self, values: dict[str, Any]):
        """N cells, each merged with block weights drawn from its own seed (shown above the cell, logged). `values`:
        the tab's widgets and the dice's (DICE_KEYS)."""
        specs = [("random", run_rand_axis(values)), ("none", ""), ("none", "")]
        return self.h.plot(values, specs, spec_from_values(values))

    def random_merge(self, values: dict[str, Any], to_file: bool = False):
        """One merge with weights drawn from the dice seed (-1: a new one), e.g. a Run Rand cell's seed: loaded, or
        (`to_file`, also outside the WebUI) saved like "Merge to file"."""
        import secrets

        from .tab import TITLE, ActionResult

        h = self.h
        spec = spec_from_values(values)
        seed = _whole(values.get("rand_seed", -1), "The weight seed", -1, 2**32 - 1)
        seed = secrets.randbelow(2**32) if seed == -1 else seed
        recipe = h.recipe({**values, "use_mbw": False})
        options, flags, name = h._save_args(values)
        with h.host.lock(), h.host.job(TITLE):
            plan, _ = h.service.plan(recipe)
            recipe = apply(recipe, spec, seed, plan.arch, h.service.presets)
            if to_file:
                done = h._save(lambda: h.service.save(recipe, name, options, flags["overwrite"],
                                                      flags["safetensors"], flags["metadata"]))
                message = h._saved(done)
            else:
                done = h.service.merge_and_load(recipe)
                message = done.message()
            if values.get(dice_extras.SAVE_ELIST):
                message += f"\nE-list saved: {dice_extras.save_elist(h, done.plan, done.history_id)}"
        drawn = f"alpha {recipe.weights_alpha}" + (f"; beta {recipe.weights_beta}" if "beta" in spec.targets else "")
        return ActionResult(f"{message}\nWeight seed {seed}: {drawn}")

    def reserve(self, values: dict[str, Any], run_rand: bool = False) -> str:
        """Queue the plot the widgets describe (or, with `run_rand`, the dice's Run Rand)."""
        spec = None
        if run_rand:
            spec = spec_from_values(values).to_dict()  # plain data: the queue is kept in a file
            values = {**values, "x_type": "random", "x_values": run_rand_axis(values), "y_type": "none",
                      "z_type": "none"}
        number = self.queue.add(values, spec)
        notice = f"\n{self.queue.notice}" if self.queue.notice else ""
        return f"Plot #{number} is queued; press 'Run queue' to run the waiting plots in order.{notice}"

    def run_queue(self):
        from .tab import ActionResult

        def plot(entry):
            result = self.h.plot(entry.values, None, spec_from_dict(entry.extra) if entry.extra else None)
            return result.message.splitlines()[0], list(result.images or [])

        done = self.queue.run(plot, self.h.host.interrupted)
        images = [image for entry in done for image in entry.results]
        lines = [f"#{e.number} {e.status}: {e.message}" for e in done] or ["No plot is waiting in the queue."]
        return ActionResult("\n".join(lines), images)

    def save_preset(self, name: str, values: dict[str, Any]) -> str:
        self.presets.save(name, {f: values.get(f) for f in FIELDS})
        return f"Saved plot preset {name.strip()!r} in {self.presets.user_path}."


# -- layout and events ----------------------------------------------------------------------------------------


class Panels:
    """Builds the widgets where the Merge tab calls it and wires them afterwards (`wire`)."""

    def __init__(self):
        self.d: dict[str, Any] = {}  # widgets by name

    def extended_editor(self) -> None:
        d = self.d
        with gr.Accordion("Extended SDXL weights (110 fine blocks)", open=False, elem_id="bm_ext_acc"):
            gr.Markdown("SDXL only: one weight per transformer block (e.g. IN71 = input_blocks.7.1 without its "
                        "transformer blocks, IN713 = its transformer block 3). CLIPL and VAE take the first value.")
            d["ext_text"] = gr.Textbox(label="110 weights (CLIPL, CLIPG, IN0, IN00, IN10, ... TIME, LABEL, VAE)",
                                       lines=2, max_lines=6, elem_id="bm_ext_text")
            d["ext_chart"] = gr.HTML(weights_svg(""), elem_id="bm_ext_chart")
            with gr.Row():
                d["ext_from"] = gr.Button("From block weights (alpha)", size="sm", elem_id="bm_ext_from")
                d["ext_alpha"] = gr.Button("Use for alpha", size="sm", elem_id="bm_ext_alpha")
                d["ext_beta"] = gr.Button("Use for beta", size="sm", elem_id="bm_ext_beta")
            boxes = []
            sections = (("BASE, IN00-IN03", BLOCKS_XL[:5]), ("IN04-IN08", BLOCKS_XL[5:10]), ("M00", ("M00",)),
                        ("OUT00-OUT08", BLOCKS_XL[11:]))
            fine = groups()
            for title, blocks in sections:
                with gr.Accordion(title, open=False):
                    for block in blocks:
                        labels = fine[block]
                        boxes.append(gr.Textbox(label=f"{block}: {', '.join(labels)}", max_lines=2,
                                                elem_id=f"bm_ext_{block}"))
            d["ext_groups"] = boxes  # in BLOCKS_XL order

    def plot_extras(self, gen_off: str | None) -> None:
        d = self.d
        with gr.Row():
            d["set_x"] = gr.Button("↑ Set X (alpha weights)", size="sm", elem_id="bm_set_x")
            d["set_y"] = gr.Button("↑ Set Y (beta weights)", size="sm", elem_id="bm_set_y")
        with gr.Row(equal_height=True):
            d["preset"] = gr.Dropdown([], value=None, label="Plot preset", elem_id="bm_xyz_preset",
                                      allow_custom_value=True, scale=3)
            d["preset_load"] = gr.Button("Load", size="sm", elem_id="bm_xyz_preset_load", min_width=60)
            d["preset_save"] = gr.Button("Save", size="sm", elem_id="bm_xyz_preset_save", min_width=60)
            d["preset_delete"] = gr.Button("Delete", size="sm", elem_id="bm_xyz_preset_delete", min_width=60)
        with gr.Accordion("Reservation queue", open=False, elem_id="bm_queue_acc"):
            with gr.Row(equal_height=True):
                d["reserve"] = gr.Button("Reserve plot", elem_id="bm_queue_add", min_width=90)
                d["run_queue"] = gr.Button("Run queue", elem_id="bm_queue_run", min_width=90,
                                           interactive=not gen_off)
                d["remove_number"] = gr.Number(-1, label="# to remove (-1 = all waiting)", precision=0,
                                               elem_id="bm_queue_number", min_width=120)
                d["remove"] = gr.Button("Remove", elem_id="bm_queue_remove", min_width=80)
            d["queue"] = gr.Dataframe(headers=list(HEADERS), datatype=["str"] * len(HEADERS),
                                      value=PlotQueue().table(), interactive=False, wrap=True,
                                      elem_id="bm_queue")

    def dice(self, gen_off: str | None, live_off: str | None) -> None:
        d = self.d
        with gr.Accordion("Let the Dice roll (random weights)", open=False, elem_id="bm_dice_acc"):
            with gr.Row():
                d["rand_mode"] = gr.Dropdown(list(RANDOM_MODES), value="R", label="Random mode",
                                             elem_id="bm_rand_mode", min_width=100)
                d["rand_targets"] = gr.CheckboxGroup(list(TARGETS), value=["alpha"], label="Draw weights for",
                                                     elem_id="bm_rand_targets")
                d["rand_extend"] = gr.Checkbox(False, label="extend XL (110 weights)", elem_id="bm_rand_extend")
            with gr.Row():
                d["rand_seed"] = gr.Number(-1, label="Weight seed (-1 = a new one per cell)", precision=0,
                                           elem_id="bm_rand_seed")
                d["rand_round"] = gr.Number(3, label="Round (decimals)", precision=0, elem_id="bm_rand_round")
                d["rand_count"] = gr.Number(4, label="Num of cells (Run Rand)", precision=0,
                                            elem_id="bm_rand_count")
            d["rand_template"] = gr.Textbox(label="custom: one token per block (numbers, R, U, X, D, ER, EU, EX) "
                                                  "or a preset name such as ALL_R", max_lines=2,
                                            elem_id="bm_rand_template")
            with gr.Row():
                d["rand_upper"] = gr.Textbox("1", label="Upper limit for X, mid point of D (one or per block)",
                                             max_lines=2, elem_id="bm_rand_upper")
                d["rand_lower"] = gr.Textbox("0", label="Lower limit for X (xRp: x with chance p, else 0), range "
                                                        "of D", max_lines=2, elem_id="bm_rand_lower")
            with gr.Row():
                d["rand_clamp_upper"] = gr.Textbox("", label="Clamp: at most (blank = none)", max_lines=1,
                                                   elem_id="bm_rand_clamp_upper")
                d["rand_clamp_lower"] = gr.Textbox("", label="Clamp: at least (blank = none)", max_lines=1,
                                                   elem_id="bm_rand_clamp_lower")
            with gr.Row():
                d["rand_load"] = gr.Button("Upper limit from alpha weights", size="sm", elem_id="bm_rand_load")
                d["rand_merge"] = gr.Button("Random merge", elem_id="bm_rand_merge", interactive=not live_off)
                d["rand_file"] = gr.Button("Random merge to file", elem_id="bm_rand_file")
                d["rand_run"] = gr.Button("Run Rand", variant="primary", elem_id="bm_rand_run",
                                          interactive=not gen_off)
                d["rand_reserve"] = gr.Button("Reserve Run Rand", elem_id="bm_rand_reserve")
            dice_extras.build(d)  # Load from ID, save E-list

    def wire(self, h, w: dict[str, Any], parts: dict[str, Any], tab, action_keys: Sequence[str]) -> None:
        from .tab import _guard, _history_or_skip, _skip, make_action

        d, tools = self.d, PlotTools(h)
        keys = (*action_keys, *DICE_KEYS)
        inputs = [w[k] for k in action_keys] + [d[k] for k in DICE_KEYS]
        outputs = [parts["message"], parts["gallery"], parts["infotext"], parts["loaded"], parts["history"]]
        d["rand_run"].click(make_action(h, tools.run_rand, keys), inputs, outputs)
        d["rand_merge"].click(make_action(h, tools.random_merge, keys), inputs, outputs)
        d["rand_file"].click(make_action(h, lambda values: tools.random_merge(values, to_file=True), keys), inputs,
                             outputs)
        d["rand_load"].click(lambda text: text, w["weights_alpha"], d["rand_upper"], queue=False)
        dice_extras.wire(h, d, w["elemental"], parts["message"], _guard, _skip)

        # queue
        def reserve(run_rand):
            def add(*args):
                return tools.reserve(dict(zip(keys, args, strict=True)), run_rand), tools.queue.table()
            return _guard(add, lambda msg: (msg, _skip()))

        d["reserve"].click(reserve(False), inputs, [parts["message"], d["queue"]])
        d["rand_reserve"].click(reserve(True), inputs, [parts["message"], d["queue"]])

        def remove(number):
            tools.queue.remove(int(number if number not in (None, "") else -1))
            return "Removed." if number not in (None, "", -1) else "Removed every waiting plot.", tools.queue.table()

        d["remove"].click(_guard(remove, lambda msg: (msg, _skip())), d["remove_number"],
                          [parts["message"], d["queue"]], queue=False)

        def run_queue():
            result = tools.run_queue()
            images = gr.update(value=result.images) if result.images else _skip()
            return result.message, images, tools.queue.table(), h.loaded_model(), _history_or_skip(h)

        d["run_queue"].click(_guard(run_queue, lambda msg: (msg, _skip(), tools.queue.table(), _skip(), _skip())),
                             None, [parts["message"], parts["gallery"], d["queue"], parts["loaded"],
                                    parts["history"]])

        # Set X / Set Y
        for button, axis, field in ((d["set_x"], "x", "weights_alpha"), (d["set_y"], "y", "weights_beta")):
            def copy(kind, text, weights, new_kind="mbw alpha" if axis == "x" else "mbw beta"):
                return (*set_axis(kind, text, weights, new_kind), "")

            button.click(_guard(copy, lambda msg: (_skip(), _skip(), msg)),
                         [w[f"{axis}_type"], w[f"{axis}_values"], w[field]],
                         [w[f"{axis}_type"], w[f"{axis}_values"], parts["message"]], queue=False)

        # plot presets
        axis_widgets = [w[f] for f in FIELDS]

        def load(name):
            preset = tools.presets.get(name)
            return [*(preset[f] for f in FIELDS), f"Loaded plot preset {name!r}."]

        def save(name, *axes):
            message = tools.save_preset(name, dict(zip(FIELDS, axes, strict=True)))
            return gr.update(choices=tools.presets.names(), value=name.strip()), message

        def delete(name):
            tools.presets.delete(name)
            return gr.update(choices=tools.presets.names(), value=None), f"Deleted plot preset {name!r}."

        d["preset_load"].click(_guard(load, lambda msg: [*([_skip()] * len(FIELDS)), msg]), d["preset"],
                               [*axis_widgets, parts["message"]], queue=False)
        d["preset_save"].click(_guard(save, lambda msg: (_skip(), msg)), [d["preset"], *axis_widgets],
                               [d["preset"], parts["message"]], queue=False)
        d["preset_delete"].click(_guard(delete, lambda msg: (_skip(), msg)), d["preset"],
                                 [d["preset"], parts["message"]], queue=False)
        tab.load(_guard(lambda: gr.update(choices=tools.presets.names()), lambda msg: _skip()), None,
                          d["preset"], queue=False)
        # the queue as kept in its file (and why it was set aside, if it was damaged)
        tab.load(_guard(lambda: (tools.queue.table(), tools.queue.notice or _skip()), lambda msg: (_skip(), msg)),
                 None, [d["queue"], parts["message"]], queue=False)

        self._wire_extended(w, parts, _guard, _skip)

    def _wire_extended(self, w, parts, _guard, _skip) -> None:
        d = self.d
        boxes = d["ext_groups"]

        def typed(text):
            texts = group_texts(text)
            chart = weights_svg(text)
            return [chart, *([_skip()] * len(boxes) if texts is None else texts)]

        for event in (d["ext_text"].input, d["ext_text"].blur):
            event(typed, d["ext_text"], [d["ext_chart"], *boxes], queue=False)

        def group_edited(current, *texts):
            text = join_groups(texts, current)
            return text, weights_svg(text), ""

        for box in boxes:
            box.blur(_guard(group_edited, lambda msg: (_skip(), _skip(), msg)), [d["ext_text"], *boxes],
                     [d["ext_text"], d["ext_chart"], parts["message"]], queue=False)

        def expand(alpha):
            text = expand_to_fine(alpha)
            return [text, weights_svg(text), *group_texts(text), ""]

        d["ext_from"].click(_guard(expand, lambda msg: [*([_skip()] * (len(boxes) + 2)), msg]), w["weights_alpha"],
                            [d["ext_text"], d["ext_chart"], *boxes, parts["message"]], queue=False)

        def use(text):
            if group_texts(text) is None:
                raise MergeError("The extended editor holds no 110 values yet ('From block weights' fills it).")
            return text, True, uv.SDXL, ""

        for button, field in ((d["ext_alpha"], "weights_alpha"), (d["ext_beta"], "weights_beta")):
            button.click(_guard(use, lambda msg: (_skip(), _skip(), _skip(), msg)), d["ext_text"],
                         [w[field], w["use_mbw"], w["block_type"], parts["message"]], queue=False)
