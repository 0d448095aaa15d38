"""Unit tests of the codebook machinery that vq, mcq and rq share (tokzoo.quantizers.base.CodebookSet) and of
every quantizer's usage statistics: Euclidean / cosine lookup, EMA updates, k-means init, dead-code restarts,
windowed usage and perplexity, the blocked nearest-code search, bf16 on larger codebooks. Per-quantizer maths:
test_quantizers.py; what every quantizer must do: test_contracts.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from component_checks import check_bf16_autocast

import tokzoo.quantizers.base as qbase
from tokzoo.quantizers import build_quantizer
from tokzoo.quantizers.fsq import FiniteScalarQuantizer
from tokzoo.quantizers.lfq import LookupFreeQuantizer
from tokzoo.quantizers.rq import ResidualQuantizer


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---- VQ: lookup, codebook updates, init, restarts ----------------------------------------------------------
def test_vq_euclidean_lookup_is_nearest_code() -> None:
    q = build_quantizer("vq", dim=8, codebook_size=64, normalize=False).eval()
    with torch.no_grad():  # codes of very different norms, so Euclidean and cosine choices differ
        q.codebooks.embed.mul_(torch.rand(1, 64, 1) * 4)
    z = torch.randn(4, 32, 8)
    out = q(z)
    embed = q.codebooks.embed[0]
    brute = torch.cdist(z.reshape(-1, 8), embed).argmin(-1)
    assert torch.equal(out.indices.reshape(-1), brute)
    cosine = (F.normalize(z.reshape(-1, 8), dim=-1) @ F.normalize(embed, dim=-1).T).argmax(-1)
    assert not torch.equal(brute, cosine)
    torch.testing.assert_close(out.z_q.reshape(-1, 8), embed[brute])


def test_vq_cosine_lookup_is_max_cosine_code() -> None:
    q = build_quantizer("vq", dim=8, codebook_size=64, normalize=True).eval()
    with torch.no_grad():
        q.codebooks.embed.mul_(torch.rand(1, 64, 1) * 4)  # raw norms must not matter
    z = torch.randn(4, 32, 8) * 3
    out = q(z)
    embed = q.codebooks.embed[0]
    cosine = (F.normalize(z.reshape(-1, 8), dim=-1) @ F.normalize(embed, dim=-1).T).argmax(-1)
    assert torch.equal(out.indices.reshape(-1), cosine)
    assert not torch.equal(cosine, torch.cdist(z.reshape(-1, 8), embed).argmin(-1))
    # z_q is the unit-norm code (UniTok: l2-normalised codes)
    torch.testing.assert_close(out.z_q.reshape(-1, 8), F.normalize(embed, dim=-1)[cosine])


def test_vq_ema_codebook_is_a_buffer_moving_toward_assigned_inputs() -> None:
    decay, k, c = 0.5, 6, 4
    q = build_quantizer("vq", dim=c, codebook_size=k, normalize=False, update="ema", ema_decay=decay)
    assert list(q.parameters()) == []
    assert "codebooks.embed" in dict(q.named_buffers())
    book = q.codebooks
    old = book.embed[0].clone()
    z = torch.randn(1, 40, c)
    out = q.train()(z)
    idx, x = out.indices.reshape(-1), z.reshape(-1, c)
    assert torch.equal(idx, torch.cdist(x, old).argmin(-1))  # assigned with the old codes
    # Loss: commitment only (no codebook term in EMA mode)
    torch.testing.assert_close(out.loss, 0.25 * (x - old[idx]).pow(2).mean())
    assert not out.loss.requires_grad

    # The EMA step recomputed by hand (Laplace-smoothed counts).
    counts = torch.bincount(idx, minlength=k).float()
    sums = torch.zeros(k, c).index_add_(0, idx, x)
    ema_count = decay * 1.0 + (1 - decay) * counts
    ema_sum = decay * old + (1 - decay) * sums
    total = ema_count.sum()
    smoothed = (ema_count + book.ema_epsilon) / (total + k * book.ema_epsilon) * total
    new = book.embed[0]
    torch.testing.assert_close(new, ema_sum / smoothed[:, None])
    for code in idx.unique():
        target = x[idx == code].mean(0)
        assert (new[code] - target).norm() < (old[code] - target).norm()


def test_ema_codes_stay_finite_when_unused_for_long() -> None:
    # Unused codes' EMA counts decay until they underflow to zero; the Laplace smoothing keeps the division
    # finite (a plain ema_sum / ema_count would give 0 / 0).
    q = build_quantizer("vq", dim=4, codebook_size=4, normalize=False, update="ema", ema_decay=0.5).train()
    code = q.codebooks.embed[0, 0].clone()
    for _ in range(200):
        out = q(code.expand(1, 4, 4).clone())
    assert (q.codebooks.ema_count[0, 1:] == 0).all()  # the underflow really happened
    assert torch.isfinite(q.codebooks.embed).all()
    assert (out.indices == 0).all()
    torch.testing.assert_close(q.codebooks.embed[0, 0], code)


def test_vq_grad_mode_loss_and_codebook_gradient() -> None:
    q = build_quantizer("vq", dim=4, codebook_size=8, normalize=True, update="grad").train()
    assert isinstance(q.codebooks.embed, torch.nn.Parameter)
    z = torch.randn(2, 6, 4, requires_grad=True)
    out = q(z)
    idx = out.indices.reshape(-1)

    embed = q.codebooks.embed.detach().clone().requires_grad_(True)
    x = F.normalize(z.reshape(-1, 4), dim=-1)
    e = F.normalize(embed[0], dim=-1)[idx]
    commitment = (x - e.detach()).pow(2).mean()
    codebook = (e - x.detach()).pow(2).mean()
    torch.testing.assert_close(out.loss, 0.25 * commitment + 1.0 * codebook)

    out.loss.backward()
    (1.0 * codebook).backward()
    assert q.codebooks.embed.grad is not None and q.codebooks.embed.grad.abs().sum() > 0
    # The codebook gets exactly the codebook term (weight 1), the input exactly the commitment term (0.25).
    torch.testing.assert_close(q.codebooks.embed.grad, embed.grad)
    (z_grad,) = torch.autograd.grad(0.25 * (F.normalize(z.reshape(-1, 4), dim=-1) - e.detach()).pow(2).mean(), z)
    torch.testing.assert_close(z.grad, z_grad)


def test_codebook_lookup_gradient_adds_repeated_codes_in_token_order() -> None:
    """Bitwise reproducible training of gradient codebooks: the lookup's backward must sum the gradients of tokens
    that share a code in one fixed order. Tensor indexing (codes[arange, indices]) accumulated them in a
    thread-dependent order on CPU: two identical loss_conflict runs ended 0.05 dB PSNR apart."""
    books = build_quantizer("mcq", dim=64, num_codebooks=2, codebook_size=16, update="grad").codebooks
    codes = books.codes().detach().requires_grad_(True)  # (2, 16, 32)
    indices = torch.randint(0, 16, (8192, 2))  # ~512 tokens per code
    grad = torch.randn(8192, 2, 32)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the unordered accumulation needs several threads to show
    try:
        books.lookup(indices, codes).backward(grad)
    finally:
        torch.set_num_threads(threads)
    reference = torch.zeros_like(codes)
    for token in range(indices.shape[0]):  # one addition per token, in token order
        for book in range(2):
            reference[book, indices[token, book]] += grad[token, book]
    assert torch.equal(codes.grad, reference)


def test_vq_loss_weights_are_configurable() -> None:
    z = torch.randn(2, 6, 4)
    torch.manual_seed(3)
    a = build_quantizer("vq", dim=4, codebook_size=8).train()
    torch.manual_seed(3)
    b = build_quantizer("vq", dim=4, codebook_size=8, commitment_weight=0.5, codebook_weight=2.0).train()
    # both terms have the same value (mse between x and e), so the loss scales with the weights' sum
    torch.testing.assert_close(a(z).loss / 1.25, b(z).loss / 2.5)


@pytest.mark.parametrize("update", ["grad", "ema"])
def test_kmeans_init_only_on_first_training_batch(update: str) -> None:
    k = 4
    q = build_quantizer("vq", dim=3, codebook_size=k, normalize=False, update=update, kmeans_init=True)
    book = q.codebooks
    init = book.embed.detach().clone()
    centers = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [-5.0, -5.0, -5.0]])

    q.eval()(torch.randn(1, 16, 3))  # eval / sanity-check batch: no init
    assert not bool(book.initialized)
    assert torch.equal(book.embed, init)

    batch = (centers[torch.arange(64) % k] + 0.01 * torch.randn(64, 3))[None]
    q.train()(batch)
    assert bool(book.initialized)
    # Every code is a k-means centroid of the training batch: the mean of the batch points nearest to it
    # (Lloyd's fixed point; it may be a local optimum, so no claim that every cluster gets its own code).
    embed = book.embed.detach()[0]
    assign = torch.cdist(batch[0], embed).argmin(-1)
    for code in range(k):
        assert (assign == code).any()
        torch.testing.assert_close(embed[code], batch[0][assign == code].mean(0), rtol=1e-4, atol=1e-4)
    assert torch.cdist(embed, init[0]).min() > 0.5  # far from the random init

    if update == "grad":  # without an optimizer step, a second training batch leaves the codes as they are
        after_init = book.embed.detach().clone()
        q.train()(torch.randn(1, 64, 3) * 10)
        assert torch.equal(book.embed.detach(), after_init)


@pytest.mark.parametrize("update", ["grad", "ema"])
def test_dead_code_restart(update: str) -> None:
    k, every = 8, 3
    q = build_quantizer(
        "vq",
        dim=4,
        codebook_size=k,
        normalize=False,
        update=update,
        restart_dead_after=every,
        stats_window=100,
    ).train()
    book = q.codebooks
    codes = book.embed.detach()[0].clone()
    near0 = lambda: (codes[0] + 0.001 * torch.randn(16, 4))[None]
    both = torch.cat([near0(), (codes[1] + 0.001 * torch.randn(16, 4))[None]], dim=1)

    q(both)  # step 1: codes 0 and 1 used
    q(near0())  # step 2: only code 0
    before = book.embed.detach()[0].clone()
    last = near0()
    q(last)  # step 3: restart; code 1 idle 2 steps (< 3) survives, codes 2..7 never used are replaced
    after = book.embed.detach()[0]
    idle = book.tracker.idle_steps()[0]
    torch.testing.assert_close(after[1], before[1])
    assert int(idle[1]) == 2
    for code in range(2, k):
        assert not torch.allclose(after[code], codes[code])
        # replaced by an input of this batch, and its idle counter reset
        assert torch.cdist(after[code][None], last[0]).min() < 1e-5
        assert int(idle[code]) == 0
    if update == "ema":
        torch.testing.assert_close(book.ema_sum[0, 2:], after[2:])
        assert torch.equal(book.ema_count[0, 2:], torch.ones(k - 2))


def test_no_restart_without_option_and_before_the_period() -> None:
    q = build_quantizer("vq", dim=4, codebook_size=8, normalize=False, restart_dead_after=0).train()
    init = q.codebooks.embed.detach().clone()
    for _ in range(5):
        q(torch.randn(1, 4, 4) * 0.01 + q.codebooks.embed.detach()[0, :1])
    assert torch.equal(q.codebooks.embed.detach(), init)
    r = build_quantizer("vq", dim=4, codebook_size=8, normalize=False, restart_dead_after=4).train()
    init = r.codebooks.embed.detach().clone()
    for _ in range(3):
        r(torch.randn(1, 4, 4) * 0.01 + r.codebooks.embed.detach()[0, :1])
    assert torch.equal(r.codebooks.embed.detach(), init)


# ---- statistics --------------------------------------------------------------------------------------------
def test_stats_single_code_vq() -> None:
    k = 8
    q = build_quantizer("vq", dim=4, codebook_size=k, normalize=True).train()
    code = q.codebooks.codes()[0, 3]
    stats = q(code.expand(2, 10, 4).clone()).stats
    assert set(stats) == {"usage", "perplexity", "dead_codes"}
    assert float(stats["usage"]) == pytest.approx(1 / k)
    assert float(stats["dead_codes"]) == pytest.approx(1 - 1 / k)
    assert float(stats["perplexity"]) == pytest.approx(1.0, abs=1e-4)


def test_stats_per_codebook_mcq() -> None:
    k = 8
    q = build_quantizer("mcq", dim=4, num_codebooks=2, codebook_size=k, normalize=False).train()
    codes = q.codebooks.codes()
    # chunk 0 always hits code 5; chunk 1 alternates codes 1 and 2 (equally often)
    tokens = torch.stack([torch.cat([codes[0, 5], codes[1, 1 + t % 2]]) for t in range(10)])[None]
    stats = q(tokens).stats
    assert float(stats["usage/0"]) == pytest.approx(1 / k)
    assert float(stats["usage/1"]) == pytest.approx(2 / k)
    assert float(stats["usage"]) == pytest.approx(1.5 / k)
    assert float(stats["dead_codes/1"]) == pytest.approx(1 - 2 / k)
    assert float(stats["perplexity/0"]) == pytest.approx(1.0, abs=1e-4)
    assert float(stats["perplexity/1"]) == pytest.approx(2.0, abs=1e-4)
    assert float(stats["perplexity"]) == pytest.approx(1.5, abs=1e-4)


def test_stats_per_depth_rq() -> None:
    k = 8
    q = ResidualQuantizer(dim=4, depth=2, codebook_size=k, restart_dead_after=0).eval()
    codes = q.codebooks[0].codes()[0]
    tokens = codes[[3, 4]].repeat(5, 1)[None]  # depth 0 hits codes 3 and 4 exactly; depth 1 the zero code
    out = q(tokens)
    assert set(out.indices[0, :, 0].tolist()) == {3, 4} and set(out.indices[0, :, 1].tolist()) == {0}
    stats = q.train()(tokens).stats
    assert float(stats["usage/0"]) == pytest.approx(2 / k)
    assert float(stats["usage/1"]) == pytest.approx(1 / k)
    assert float(stats["perplexity/0"]) == pytest.approx(2.0, abs=1e-4)
    assert float(stats["perplexity/1"]) == pytest.approx(1.0, abs=1e-4)


def test_stats_per_group_lfq_and_fsq() -> None:
    lfq = LookupFreeQuantizer(dim=4, num_codebooks=2).train()
    # group 0 always 11 (index 3); group 1 alternates 00 and 01
    tokens = torch.tensor([[1.0, 1.0, -1.0, -1.0], [1.0, 1.0, -1.0, 1.0]]).repeat(3, 1)[None]
    stats = lfq(tokens).stats
    assert float(stats["usage/0"]) == pytest.approx(1 / 4) and float(stats["usage/1"]) == pytest.approx(2 / 4)
    assert float(stats["perplexity/1"]) == pytest.approx(2.0, abs=1e-4)

    fsq = FiniteScalarQuantizer(levels=[3, 3], num_codebooks=2).train()
    tokens = torch.tensor([[5.0, 5.0, -5.0, 0.0], [5.0, 5.0, 0.0, 0.0], [5.0, 5.0, 5.0, 0.0]])[None]
    stats = fsq(tokens).stats
    assert float(stats["usage/0"]) == pytest.approx(1 / 9) and float(stats["usage/1"]) == pytest.approx(3 / 9)
    assert float(stats["perplexity/1"]) == pytest.approx(3.0, abs=1e-4)


def test_stats_window_marks_codes_dead() -> None:
    k, window = 4, 3
    q = build_quantizer("vq", dim=4, codebook_size=k, normalize=False, stats_window=window).train()
    codes = q.codebooks.codes()[0]
    hit = lambda i: q(codes[i].expand(1, 4, 4).clone()).stats
    assert float(hit(0)["usage"]) == pytest.approx(1 / 4)  # step 1: code 0
    assert float(hit(1)["usage"]) == pytest.approx(2 / 4)  # step 2: code 1
    assert float(hit(1)["usage"]) == pytest.approx(2 / 4)  # step 3: code 0 idle for 2 steps, still live
    stats = hit(1)  # step 4: code 0 idle for 3 = window steps: dead
    assert float(stats["usage"]) == pytest.approx(1 / 4)
    assert float(stats["dead_codes"]) == pytest.approx(3 / 4)
    assert float(hit(0)["usage"]) == pytest.approx(2 / 4)  # and alive again when hit


# ---- blocked nearest-code search ---------------------------------------------------------------------------
@pytest.fixture
def bmm_spy(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    sizes: list[int] = []
    real = torch.bmm

    def spy(a: torch.Tensor, b: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = real(a, b, *args, **kwargs)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(torch, "bmm", spy)
    return sizes


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("limit", [1000, 4096, 1 << 24])
def test_blocked_search_matches_brute_force(
    monkeypatch: pytest.MonkeyPatch, bmm_spy: list[int], normalize: bool, limit: int
) -> None:
    n, k = 2, 100
    monkeypatch.setattr(qbase, "SEARCH_BLOCK_ELEMENTS", limit)
    q = build_quantizer("mcq", dim=2 * 8, num_codebooks=n, codebook_size=k, normalize=normalize).eval()
    z = torch.randn(3, 111, 16)
    out = q(z)
    assert bmm_spy and max(bmm_spy) <= limit  # score blocks bounded by the limit
    if limit < 3 * 111 * n * k:
        assert len(bmm_spy) > 1  # it really searched in blocks
    codes = q.codebooks.codes()
    for i in range(n):
        chunk = z[..., 8 * i : 8 * (i + 1)].reshape(-1, 8)
        if normalize:
            brute = (F.normalize(chunk, dim=-1) @ codes[i].T).argmax(-1)
        else:
            brute = torch.cdist(chunk, codes[i]).argmin(-1)
        assert torch.equal(out.indices[..., i].reshape(-1), brute)


@pytest.mark.slow
def test_search_65536_codes_65536_tokens_completes(bmm_spy: list[int]) -> None:
    # 20-55 s on 2 CPU cores (4.3e9 scores, 256 blocks of 64 MiB); a full score matrix would need 16 GiB.
    q = build_quantizer("vq", dim=8, codebook_size=65536).eval()
    z = torch.randn(1, 65536, 8)
    with torch.no_grad():
        out = q(z)
    assert out.indices.shape == (1, 65536, 1)
    assert max(bmm_spy) <= qbase.SEARCH_BLOCK_ELEMENTS and len(bmm_spy) == 65536 * 65536 // qbase.SEARCH_BLOCK_ELEMENTS
    sample = torch.randint(0, 65536, (64,))
    brute = (F.normalize(z[0, sample], dim=-1) @ q.codebooks.codes()[0].T).argmax(-1)
    assert torch.equal(out.indices[0, sample, 0], brute)


# ---- bf16 autocast (the registry examples: test_contracts.py) ----------------------------------------------
@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("vq", dict(dim=16, codebook_size=256)),
        ("vq", dict(dim=16, codebook_size=256, normalize=False)),
        ("mcq", dict(dim=16, num_codebooks=4, codebook_size=256)),
        ("rq", dict(dim=16, depth=4, codebook_size=256)),
        ("fsq", dict(levels=[8, 6, 5], num_codebooks=2)),
    ],
)
def test_bf16_autocast_larger_codebooks(name: str, kwargs: dict) -> None:
    check_bf16_autocast(build_quantizer(name, **kwargs))


def test_bf16_under_autocast_distances_in_fp32() -> None:
    # Many near-ties: a bf16 distance computation would pick different codes for some tokens.
    q = build_quantizer("vq", dim=32, codebook_size=1024, normalize=False).eval()
    z = torch.randn(1, 512, 32).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
    brute = torch.cdist(z[0].double(), q.codebooks.codes()[0].double()).argmin(-1)
    assert (out.indices[0, :, 0] == brute).float().mean() > 0.99
