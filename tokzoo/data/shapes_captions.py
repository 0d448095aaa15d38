"""The embedded dataset's words: its vocabulary, the captions it composes from attribute rows, and the prompts that
score it (zero-shot for the shape class and for each other attribute a caption style names).

Every prompt is a caption the dataset itself can produce (a text tower trained from scratch on these captions has
never seen "a photo of a ..."): the prompts for one value of an attribute are captions of rows that hold that value
and random other attributes, drawn under the generator's own rule (the background never has the shape's colour), and
the class embedding is their mean, which ensembles over the attributes the task does not ask about.
"""

from __future__ import annotations

import numpy as np

from tokzoo.data.common import AttributeTask
from tokzoo.errors import ConfigError

SHAPE_NAMES = [
    "circle", "square", "triangle", "diamond", "pentagon", "hexagon", "star", "cross", "ring", "crescent",
]  # fmt: skip
COLORS = {
    "red": (215, 38, 45),
    "orange": (245, 135, 30),
    "yellow": (240, 210, 50),
    "green": (50, 160, 70),
    "cyan": (50, 195, 210),
    "blue": (40, 80, 200),
    "purple": (130, 60, 180),
    "pink": (240, 130, 185),
    "white": (240, 240, 235),
    "black": (30, 30, 35),
    "gray": (130, 130, 130),
    "brown": (135, 85, 45),
}
SIZES = ["small", "medium", "large"]
POSITIONS = [
    "in the top left", "at the top", "in the top right",
    "on the left", "in the center", "on the right",
    "in the bottom left", "at the bottom", "in the bottom right",
]  # fmt: skip
BACKGROUNDS = ["plain {} background", "{} gradient background", "striped {} background",
               "checkered {} background", "noisy {} background"]  # fmt: skip
CAPTION_STYLES = ("full", "object", "shape")
_COLOR_NAMES = list(COLORS)
# columns of the attribute array, in this order
ATTRIBUTES = ("kind", "color", "size", "pos", "bg_kind", "bg_color")
# The attributes scored beside the shape class (column in ATTRIBUTES, value names), and which a caption style names.
ATTRIBUTE_VALUES = {
    "color": (1, _COLOR_NAMES),
    "size": (2, SIZES),
    "position": (3, [p.split(" ", 1)[1].removeprefix("the ") for p in POSITIONS]),
    "background": (4, ["plain", "gradient", "striped", "checkered", "noisy"]),  # the pattern (BACKGROUNDS' order)
}
STYLE_ATTRIBUTES = {"full": ("color", "size", "position", "background"), "object": ("color",), "shape": ()}
PROMPTS_PER_VALUE = 24  # captions drawn per value (fewer distinct ones where the style names little)
_CARDINALITIES = (len(SHAPE_NAMES), len(COLORS), len(SIZES), len(POSITIONS), len(BACKGROUNDS), len(COLORS))


def compose_captions(attributes: np.ndarray, style: str = "full", shape_word: str | None = None) -> list[str]:
    """One caption per attribute row (`shape_word`, e.g. "{}", in place of the shape's name: a prompt template).

    full:   "a large red triangle in the top left on a striped blue background" - every attribute named. In a
            contrastive batch colour, size, position and background already tell the images apart, so a model
            can match captions perfectly without ever learning the shapes (measured: zero-shot and probe at
            chance after 600 steps).
    object: "a red triangle" - 120 combinations, so a batch of 64 repeats colours and only the shape resolves
            them: contrastive training has to learn shape.
    shape:  "a triangle" - the class alone (contrastive learning becomes plain classification).
    """
    if style not in CAPTION_STYLES:
        raise ConfigError(f"shapes: captions must be one of {list(CAPTION_STYLES)}, got {style!r}")
    out = []
    for k, c, size, q, b, bc in attributes.tolist():
        shape = SHAPE_NAMES[k] if shape_word is None else shape_word
        if style == "shape":
            out.append(f"a {shape}")
        elif style == "object":
            out.append(f"a {_COLOR_NAMES[c]} {shape}")
        else:
            out.append(
                f"a {SIZES[size]} {_COLOR_NAMES[c]} {shape} {POSITIONS[q]} on a "
                + BACKGROUNDS[b].format(_COLOR_NAMES[bc])
            )
    return out


def random_rows(rng: np.random.Generator, n: int, fixed: dict[int, int] | None = None) -> np.ndarray:
    """n attribute rows drawn as the generator draws them, with the columns in `fixed` set to the given values."""
    rows = np.stack([rng.integers(0, card, n) for card in _CARDINALITIES], axis=1)
    for column, value in (fixed or {}).items():
        rows[:, column] = value
    rows[:, 5] = (rows[:, 1] + rng.integers(1, len(COLORS), n)) % len(COLORS)  # never the shape's colour
    return rows


def task_columns(style: str) -> list[int]:
    return [ATTRIBUTE_VALUES[name][0] for name in STYLE_ATTRIBUTES[style]]


def _unique(texts: list[str]) -> list[str]:
    return list(dict.fromkeys(texts))


def default_templates(style: str) -> list[str]:
    """Zero-shot templates for the shape class ("{}" = the shape's name), in the captions' own grammar: for `full`
    and `object` captions with random other attributes, so the class embedding ensembles over them."""
    if style == "shape":
        return ["a {}"]
    if style == "object":
        return [f"a {color} {{}}" for color in _COLOR_NAMES]
    rows = random_rows(np.random.default_rng(1234), PROMPTS_PER_VALUE)
    return _unique(compose_captions(rows, style, shape_word="{}"))


def attribute_tasks(style: str) -> dict[str, AttributeTask]:
    """The attributes `style` names besides the shape, each with its value names and per-value prompts (a sample's
    values: attributes[:, task_columns(style)])."""
    tasks = {}
    for i, name in enumerate(STYLE_ATTRIBUTES[style]):
        column, values = ATTRIBUTE_VALUES[name]
        prompts = []
        for value in range(len(values)):
            rng = np.random.default_rng([4321, i, value])
            prompts.append(_unique(compose_captions(random_rows(rng, PROMPTS_PER_VALUE, {column: value}), style)))
        tasks[name] = AttributeTask(names=list(values), prompts=prompts)
    return tasks
