"""Identical captions in the global batch are positives of each other (loss.contra_duplicates=positive).

Run as a script (`python tests/test_contrastive_duplicates.py OUT_DIR PORT`) it is the 2-rank gloo worker of the
DDP test.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import run_two_rank_script

from tokzoo.config import CONTRA_DUPLICATES, defaults, merge, resolve
from tokzoo.errors import ConfigError
from tokzoo.losses import ContrastiveLoss, caption_ids, caption_matches
from tokzoo.losses.contrastive import DUPLICATE_MODES
from tokzoo.losses.objective import TokenizerObjective

WORLD, BATCH, DIM = 2, 6, 8
# The global batch of the DDP test: "a cat" and "a dog" repeat within a rank and across the two ranks.
CAPTIONS = ["a cat", "a dog", "a cat", "a bird", "a fox", "a dog"] + [
    "a dog",
    "a cat",
    "an owl",
    "a cat",
    "a elk",
    "a elk",
]
LOSS_CFG = dict(
    supervision="contra", l1_weight=0.2, l2_weight=1.0, lpips_weight=0.0, quant_weight=1.0, contra_weight=1.0,
    gan_weight=0.0, gan_start=0.0,
)  # fmt: skip


def embeddings(n: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(img + 0.7 * torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=-1)
    return img.to(dtype), txt.to(dtype)


def reference_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Written plainly: for each row, the target is uniform over the columns whose caption equals the row's, and
    the row's loss is the cross-entropy of that target with the softmax of the row's logits; both directions."""
    n = len(captions)
    logits = scale * img @ txt.t()
    total = torch.zeros((), dtype=img.dtype)
    for direction in (logits, logits.t()):  # image -> text, text -> image
        for i in range(n):
            log_p = torch.log_softmax(direction[i], dim=0)
            columns = [j for j in range(n) if captions[j] == captions[i]]
            total = total - sum(log_p[j] for j in columns) / len(columns)
    return total / (2 * n)


def todays_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The one-hot CLIP InfoNCE, every pair distinct."""
    logits = scale * img @ txt.t()
    labels = torch.arange(img.shape[0])
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def multi_positive(img, txt, scale, captions):
    return ContrastiveLoss()(img, txt, scale, caption_matches(caption_ids(captions, img.device)))


def fake_output(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> SimpleNamespace:
    quant = SimpleNamespace(loss=torch.zeros(()))
    return SimpleNamespace(recon=None, quant=quant, image_emb=img, text_emb=txt, logit_scale=scale)


def test_caption_ids_identify_identical_strings_stably():
    ids = caption_ids(["a cat", "a dog", "a cat", "A cat"], torch.device("cpu"))
    assert ids.dtype == torch.int64 and (ids >= 0).all()
    assert ids[0] == ids[2] and len({int(ids[0]), int(ids[1]), int(ids[3])}) == 3
    # a hash of the bytes, not Python's per-process salted hash(): the same in every rank and every run
    assert int(ids[0]) == 5867787368591784627


def test_caption_matches_and_positives_per_row():
    matches = caption_matches(caption_ids(["a", "a", "b", "c", "c", "c"], torch.device("cpu")))
    assert matches.shape == (6, 6) and torch.equal(matches, matches.t()) and matches.diagonal().all()
    objective = TokenizerObjective(LOSS_CFG, max_steps=10, lpips=False)
    img, txt = embeddings(6)
    terms = objective(fake_output(img, txt, torch.tensor(10.0)), None, 0, caption_ids(list("aabccc"), img.device))
    assert terms["contra_positives_per_row"].item() == pytest.approx((2 + 2 + 1 + 3 + 3 + 3) / 6)


@pytest.mark.parametrize("seed", [0, 1])
def test_multi_positive_loss_matches_the_brute_force_reference(seed):
    img, txt = embeddings(len(CAPTIONS), seed=seed)
    scale = torch.tensor(7.0)
    loss = multi_positive(img, txt, scale, CAPTIONS)
    expected = reference_loss(img.double(), txt.double(), scale.double(), CAPTIONS)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    # the duplicates change the loss: the comparison above is not the one-hot loss in disguise
    assert abs(loss.item() - todays_loss(img, txt, scale).item()) > 1e-2


def test_gradients_match_the_reference():
    img, txt = embeddings(len(CAPTIONS), seed=3)
    img, txt = img.requires_grad_(), txt.requires_grad_()
    scale = torch.tensor(5.0, requires_grad=True)
    multi_positive(img, txt, scale, CAPTIONS).backward()
    ref = [t.detach().double().requires_grad_() for t in (img, txt, scale)]
    reference_loss(*ref, CAPTIONS).backward()
    for ours, theirs in zip((img, txt, scale), ref):
        assert ours.grad.abs().sum() > 0
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=1e-5, atol=1e-6)


def test_reference_gradient_is_the_numerical_one():
    # gradcheck in float64 on a tiny case: the reference (the definition the loss is checked against) is smooth
    # and its analytic gradient is right, so the comparison of gradients above checks real derivatives.
    img, txt = (t.requires_grad_() for t in embeddings(4, torch.float64, seed=5))
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda i, t, s: reference_loss(i, t, s, ["x", "y", "x", "x"]), (img, txt, scale))


def test_no_duplicates_gives_exactly_todays_loss():
    captions = [f"a photo of a {c}." for c in "abcdefgh"]
    img, txt = embeddings(len(captions), seed=2)
    scale = torch.tensor(14.0)
    plain = ContrastiveLoss()(img, txt, scale)
    assert torch.equal(multi_positive(img, txt, scale, captions), plain)
    torch.testing.assert_close(plain, todays_loss(img, txt, scale), rtol=0, atol=1e-6)
    torch.testing.assert_close(plain.double(), reference_loss(img.double(), txt.double(), scale.double(), captions))
    objective = TokenizerObjective(LOSS_CFG, max_steps=10, lpips=False)
    out = fake_output(img, txt, scale)
    with_ids = objective(out, None, 0, caption_ids(captions, img.device))
    assert with_ids["contra_positives_per_row"].item() == 1.0
    assert torch.equal(with_ids["loss_contra"], objective(out, None, 0)["loss_contra"])  # None: today's behaviour


def test_identical_text_embeddings_make_both_modes_agree():
    # A deterministic text tower maps identical captions to identical embeddings. Then duplicate columns carry the
    # positive's own logit, and summed over a duplicate group the one-hot and the uniform targets give the same
    # loss, so the loss and its parameter gradient agree in both modes (the random embeddings of the reference
    # tests above are what makes them differ there).
    captions = ["a", "b", "a", "c", "a", "b"]
    img, _ = embeddings(len(captions), seed=6)
    g = torch.Generator().manual_seed(6)
    prototypes = {c: torch.randn(DIM, generator=g) for c in "abc"}
    weight = torch.randn(DIM, DIM, generator=g, requires_grad=True)  # a stand-in text tower

    def loss_and_grad(positives):
        txt = F.normalize(torch.stack([prototypes[c] for c in captions]) @ weight, dim=-1)
        loss = ContrastiveLoss()(img, txt, torch.tensor(10.0), positives)
        return loss, torch.autograd.grad(loss, weight)[0]

    hard, hard_grad = loss_and_grad(None)
    soft, soft_grad = loss_and_grad(caption_matches(caption_ids(captions, img.device)))
    assert hard_grad.abs().max() > 1e-2
    torch.testing.assert_close(soft, hard, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(soft_grad, hard_grad, rtol=1e-5, atol=1e-6)


def test_negative_mode_keeps_duplicates_as_negatives():
    img, txt = embeddings(len(CAPTIONS), seed=4)
    scale = torch.tensor(10.0)
    out, ids = fake_output(img, txt, scale), caption_ids(CAPTIONS, img.device)
    negative = TokenizerObjective({**LOSS_CFG, "contra_duplicates": "negative"}, max_steps=10, lpips=False)(
        out, None, 0, ids
    )
    positive = TokenizerObjective({**LOSS_CFG, "contra_duplicates": "positive"}, max_steps=10, lpips=False)(
        out, None, 0, ids
    )
    assert torch.equal(negative["loss_contra"], ContrastiveLoss()(img, txt, scale))
    torch.testing.assert_close(
        positive["loss_contra"].double(), reference_loss(*(t.double() for t in (img, txt, scale)), CAPTIONS)
    )
    # both modes log how many duplicates the batch had
    assert negative["contra_positives_per_row"] == positive["contra_positives_per_row"] > 1


def test_config_switch_default_and_validation():
    assert CONTRA_DUPLICATES == DUPLICATE_MODES
    assert resolve(defaults())["loss"]["contra_duplicates"] == "positive"
    assert (
        resolve(merge(defaults(), {"loss": {"contra_duplicates": "negative"}}))["loss"]["contra_duplicates"]
        == "negative"
    )
    with pytest.raises(ConfigError, match=r"loss\.contra_duplicates.*allowed: positive, negative"):
        resolve(merge(defaults(), {"loss": {"contra_duplicates": "ignore"}}))
    with pytest.raises(ConfigError, match="contra_duplicates"):
        TokenizerObjective({**LOSS_CFG, "contra_duplicates": "ignore"}, max_steps=10)


@pytest.mark.parametrize("mode", DUPLICATE_MODES)
def test_module_passes_caption_ids_to_the_objective(mode):
    from tokzoo.lit.module import TokenizerModule

    over = {"loss": {"supervision": "contra", "contra_duplicates": mode}, "eval": {"lpips": False, "rfid": False}}
    over["model"] = {"encoder": {"name": "vit_tiny", "depth": 1}}
    torch.manual_seed(0)
    module = TokenizerModule(resolve(merge(defaults(), over)))
    captions = ["a cat", "a cat", "a cat", "a dog"]
    batch = {"image": torch.rand(4, 3, 32, 32) * 2 - 1, "caption": captions}
    out, terms = module.loss_terms(batch, 0)
    assert terms["contra_positives_per_row"].item() == pytest.approx((3 + 3 + 3 + 1) / 4)
    args = (out.image_emb, out.text_emb, out.logit_scale)
    expected = multi_positive(*args, captions) if mode == "positive" else ContrastiveLoss()(*args)
    assert torch.equal(terms["loss_contra"], expected)


@pytest.mark.ddp
def test_two_ranks_mean_loss_is_the_reference_of_the_concatenated_batch(tmp_path):
    proc = run_two_rank_script(__file__, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    img, txt = embeddings(WORLD * BATCH)
    img, txt = img.double().requires_grad_(), txt.double().requires_grad_()
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    full = reference_loss(img, txt, scale, CAPTIONS)  # one process, the concatenated batch
    full.backward()
    mean = torch.stack([r["loss"] for r in results]).mean()
    torch.testing.assert_close(mean.double(), full.detach(), rtol=1e-5, atol=1e-6)
    # the ranks did see duplicates across the rank boundary: rank 1's "a dog" matches two rows of rank 0
    global_matches = [sum(c == d for d in CAPTIONS) for c in CAPTIONS]
    positives = torch.stack([r["positives_per_row"] for r in results]).mean()
    assert positives.item() == pytest.approx(sum(global_matches) / len(CAPTIONS))
    for rank, res in enumerate(results):
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        # all_gather's backward sums every rank's gradient into the local slice (see test_losses.py)
        torch.testing.assert_close(res["img_grad"].double(), WORLD * img.grad[rows], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["txt_grad"].double(), WORLD * txt.grad[rows], rtol=1e-5, atol=1e-6)
    scale_grad = torch.stack([r["scale_grad"] for r in results]).mean()
    torch.testing.assert_close(scale_grad.double(), scale.grad, rtol=1e-5, atol=1e-6)


def _ddp_worker(rank: int, out_dir: str, port: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        objective = TokenizerObjective(LOSS_CFG, max_steps=10, lpips=False)  # the path training takes
        img, txt = embeddings(WORLD * BATCH)
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        img, txt = img[rows].clone().requires_grad_(), txt[rows].clone().requires_grad_()
        scale = torch.tensor(10.0, requires_grad=True)
        ids = caption_ids(CAPTIONS[rows], img.device)  # each rank hashes only its own captions
        terms = objective(fake_output(img, txt, scale), None, 0, ids)
        terms["loss"].backward()
        torch.save(
            {
                "loss": terms["loss_contra"].detach(),
                "positives_per_row": terms["contra_positives_per_row"],
                "img_grad": img.grad,
                "txt_grad": txt.grad,
                "scale_grad": scale.grad,
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    # fork: the workers inherit the imported torch instead of importing it again (seconds on small machines)
    method = "fork" if sys.platform == "linux" else "spawn"
    mp.start_processes(_ddp_worker, args=(sys.argv[1], int(sys.argv[2])), nprocs=WORLD, start_method=method)
