"""The embedded dataset's attribute tasks: every zero-shot prompt is a caption the data can produce, it holds the
value it stands for, and samples carry the values the module scores (val/zeroshot_acc/<attr>, .../linprobe_acc/...)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from tokzoo.data import collate_samples
from tokzoo.data import shapes as shapes_mod
from tokzoo.data.shapes_captions import (
    ATTRIBUTE_VALUES,
    STYLE_ATTRIBUTES,
    attribute_tasks,
    compose_captions,
    default_templates,
)
from tokzoo.metrics import zero_shot_accuracy


def _every_row() -> np.ndarray:
    """All attribute rows the generator can draw (the background colour never equals the shape's)."""
    cards = [len(shapes_mod.SHAPE_NAMES), len(shapes_mod.COLORS), 3, 9, 5, len(shapes_mod.COLORS)]
    rows = np.array(list(itertools.product(*[range(c) for c in cards])))
    return rows[rows[:, 1] != rows[:, 5]]


@pytest.mark.parametrize("style", ["full", "object"])
def test_each_prompt_is_a_caption_of_a_row_holding_its_value(style):
    rows = _every_row()
    owners: dict[str, list[np.ndarray]] = {}
    for caption, row in zip(compose_captions(rows, style), rows):
        owners.setdefault(caption, []).append(row)
    tasks = attribute_tasks(style)
    assert list(tasks) == list(STYLE_ATTRIBUTES[style])
    for name, task in tasks.items():
        column, values = ATTRIBUTE_VALUES[name]
        assert task.names == values and len(task.prompts) == len(values)
        for value, prompts in enumerate(task.prompts):
            assert len(prompts) >= 5 and len(set(prompts)) == len(prompts)
            for prompt in prompts:
                assert prompt in owners, f"{name}={values[value]}: {prompt!r} is no caption the data produces"
                # a full caption names every attribute, so its row is unique; an object caption names colour
                assert all(row[column] == value for row in owners[prompt]), (name, value, prompt)


def test_shape_templates_follow_the_caption_grammar():
    rows = _every_row()
    captions = set(compose_captions(rows, "full"))
    templates = default_templates("full")
    assert len(templates) >= 10 and all(t.count("{}") == 1 for t in templates)
    for template in templates:
        assert all(template.format(name) in captions for name in shapes_mod.SHAPE_NAMES), template
    assert attribute_tasks("shape") == {}  # shape-only captions name nothing else


def test_samples_carry_their_attribute_values_through_collation(tmp_path):
    ds = shapes_mod.shapes(split="val", num_train=8, num_val=40, cache_dir=str(tmp_path))
    _, attrs = shapes_mod.load_or_generate("val", 40, 32, 0, tmp_path / "shapes")
    batch = collate_samples([ds[i] for i in range(len(ds))])
    columns = [ATTRIBUTE_VALUES[n][0] for n in ds.attribute_tasks]
    assert torch.equal(batch["attributes"], torch.from_numpy(attrs[:, columns]))
    for i, caption in enumerate(batch["caption"]):  # the values are the ones the caption names
        for j, (name, task) in enumerate(ds.attribute_tasks.items()):
            word = task.names[int(batch["attributes"][i, j])]
            assert word in caption, (name, word, caption)
    obj = shapes_mod.shapes(split="val", num_train=8, num_val=40, cache_dir=str(tmp_path), captions="object")
    assert list(obj.attribute_tasks) == ["color"] and collate_samples([obj[0]])["attributes"].shape == (1, 1)
    plain = shapes_mod.shapes(split="val", num_train=8, num_val=40, cache_dir=str(tmp_path), captions="shape")
    assert "attributes" not in collate_samples([plain[0], plain[1]])  # no task: no column


def test_prompt_ensembles_score_an_attribute_that_the_text_side_encodes():
    """Zero-shot over prompt ensembles: with text embeddings that encode colour (a bag of words) and image
    embeddings equal to the text of their own caption, colour is recovered exactly and chance stays the floor."""
    task = attribute_tasks("full")["color"]
    vocab = sorted({w for prompts in task.prompts for p in prompts for w in p.split()})

    def embed(texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), len(vocab))
        for i, text in enumerate(texts):
            words = text.split()
            out[i, vocab.index(words[2])] = 1.0  # the shape's colour word (3rd word of a full caption)
        return out

    rows = shapes_mod.generate_shapes(60, 32, seed=3)[1]
    images = embed(compose_captions(rows, "full"))
    text = torch.stack([torch.nn.functional.normalize(embed(p).mean(0), dim=0) for p in task.prompts])
    assert zero_shot_accuracy(images, torch.from_numpy(rows[:, 1]), text) == 1.0
    shuffled = torch.from_numpy(np.random.default_rng(0).permutation(rows[:, 1]))
    assert zero_shot_accuracy(images, shuffled, text) < 0.4


def test_every_comparison_column_has_its_own_header():
    """The attribute columns are one catalogue pattern; each must still name its attribute in the table."""
    from tokzoo.analysis.summary import COLUMNS

    labels = [c.label for c in COLUMNS]
    assert len(set(labels)) == len(labels)
    assert "zero-shot acc (color)" in labels and "lin. probe acc (mean)" in labels
