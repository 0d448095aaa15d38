"""Unit tests for the quantizers (vq, mcq, rq, lfq, fsq, none): shapes, decode, gradients, the maths of each
quantizer, codebook updates, statistics, blocked search and bf16 behaviour. Tiny sizes: every test runs well
under a second except the 65,536 x 65,536 search, which is marked slow."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import tokzoo.quantizers.base as qbase
import tokzoo.quantizers.fsq as fsq_module
from tokzoo.errors import ConfigError
from tokzoo.quantizers import build_quantizer, list_quantizers
from tokzoo.quantizers.base import UsageTracker
from tokzoo.quantizers.fsq import FiniteScalarQuantizer
from tokzoo.quantizers.lfq import LookupFreeQuantizer
from tokzoo.quantizers.rq import ResidualQuantizer

# Small configs for every quantizer and the number of codes per token each one produces.
SMALL = {
    "vq": dict(dim=8, codebook_size=16),
    "mcq": dict(dim=8, num_codebooks=2, codebook_size=16),
    "rq": dict(dim=8, depth=3, codebook_size=16),
    "lfq": dict(dim=8, num_codebooks=2),
    "fsq": dict(levels=[8, 5, 5], num_codebooks=2),
    "none": dict(dim=8),
}
CODES_PER_TOKEN = {"vq": 1, "mcq": 2, "rq": 3, "lfq": 2, "fsq": 2, "none": 0}
DISCRETE = ["vq", "mcq", "rq", "lfq", "fsq"]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def small(name: str, **overrides):
    return build_quantizer(name, **{**SMALL[name], **overrides})


# ---- registry ----------------------------------------------------------------------------------------------
def test_list_quantizers() -> None:
    assert list_quantizers() == ["fsq", "lfq", "mcq", "none", "rq", "vq"]


def test_unknown_quantizer_lists_allowed_names() -> None:
    with pytest.raises(ConfigError) as err:
        build_quantizer("pq", dim=8)
    msg = str(err.value)
    assert "'pq'" in msg
    for name in list_quantizers():
        assert name in msg


def test_unknown_kwarg_is_config_error() -> None:
    with pytest.raises(ConfigError) as err:
        build_quantizer("vq", dim=8, codebook_sz=16)
    assert "codebook_sz" in str(err.value) and "codebook_size" in str(err.value)


@pytest.mark.parametrize(
    "name, kwargs, words",
    [
        ("mcq", dict(dim=10, num_codebooks=3), ["dim=10", "num_codebooks=3"]),
        ("lfq", dict(dim=10, num_codebooks=4), ["dim=10", "num_codebooks=4"]),
        ("lfq", dict(dim=34, num_codebooks=2), ["17"]),  # 17 bits per group: softmax over 2^17 codes
        ("vq", dict(dim=8, codebook_size=0), ["codebook_size"]),
        ("vq", dict(dim=8, update="adam"), ["update", "ema", "grad"]),
        ("vq", dict(dim=8, ema_decay=1.0), ["ema_decay"]),
        ("rq", dict(dim=8, depth=0), ["depth"]),
        ("fsq", dict(levels=[8, 5], dim=3), ["dim=3", "levels=[8, 5]"]),
        ("fsq", dict(levels=[8, 1]), ["levels=[8, 1]"]),
        ("fsq", dict(levels=[]), ["levels=[]"]),
        ("fsq", dict(levels=[8, 5], num_codebooks=0), ["num_codebooks"]),
    ],
)
def test_bad_arguments_are_config_errors(name: str, kwargs: dict, words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        build_quantizer(name, **kwargs)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("name", list(SMALL))
def test_wrong_input_width_is_config_error(name: str) -> None:
    q = small(name)
    with pytest.raises(ConfigError, match=f"\\(B, N, {q.dim}\\)"):
        q(torch.randn(2, 3, q.dim + 1))
    with pytest.raises(ConfigError):
        q(torch.randn(6, q.dim))


# ---- shapes, dtypes, decode, gradients ---------------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(SMALL))
def test_output_shapes_and_dtypes(name: str, dtype: torch.dtype, training: bool) -> None:
    q = small(name).train(training)
    z = torch.randn(3, 5, q.dim, dtype=dtype)
    out = q(z)
    assert out.z_q.shape == z.shape and out.z_q.dtype == dtype
    assert out.indices.shape == (3, 5, CODES_PER_TOKEN[name]) and out.indices.dtype == torch.int64
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert q.num_codes_per_token == CODES_PER_TOKEN[name]
    for c, size in enumerate(q.codebook_sizes):
        assert 0 <= int(out.indices[..., c].min()) and int(out.indices[..., c].max()) < size
    if name == "fsq":
        assert float(out.loss) == 0.0
    if name == "none":
        assert torch.equal(out.z_q, z)


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("vq", {}),
        ("vq", dict(normalize=False)),
        ("vq", dict(update="ema")),
        ("mcq", {}),
        ("mcq", dict(normalize=False)),
        ("rq", {}),
        ("rq", dict(shared_codebook=True)),
        ("rq", dict(update="grad", zero_code=False)),
        ("lfq", dict(scale=0.5)),
        ("fsq", {}),
        ("fsq", dict(levels=[2, 3, 4])),
    ],
)
def test_decode_equals_z_q_in_eval(name: str, overrides: dict) -> None:
    q = small(name, **overrides)
    q.train()
    for _ in range(3):  # move EMA codebooks / trackers a little first; decode must follow the current codes
        q(torch.randn(4, 6, q.dim))
    q.eval()
    z = torch.randn(4, 6, q.dim) * 2
    out = q(z)
    decoded = q.decode(out.indices)
    assert decoded.shape == z.shape
    torch.testing.assert_close(decoded, out.z_q, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out.z_q, z)  # it really quantized


def test_none_decode_raises_and_has_no_vocabulary() -> None:
    q = small("none")
    out = q(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="continuous"):
        q.decode(out.indices)
    assert math.isinf(q.bits_per_token)


@pytest.mark.parametrize("name", list(SMALL))
def test_straight_through_gradient_reaches_input(name: str) -> None:
    q = small(name).train()
    z = torch.randn(3, 4, q.dim, requires_grad=True)
    q(z).z_q.sum().backward()
    assert z.grad is not None
    if name in ("lfq", "rq", "none"):
        # Identity straight-through on raw inputs: d(sum z_q)/dz = 1 everywhere.
        torch.testing.assert_close(z.grad, torch.ones_like(z))
    elif name == "fsq":
        assert (z.grad > 0).all()  # through tanh bounding: positive everywhere
    else:
        # Cosine lookup: the gradient passes through the l2-normalisation of each chunk, so it is not the
        # identity but must be non-zero.
        assert z.grad.abs().sum() > 0
        assert torch.isfinite(z.grad).all()


def test_straight_through_is_identity_for_euclidean_vq() -> None:
    q = small("vq", normalize=False).train()
    z = torch.randn(3, 4, 8, requires_grad=True)
    q(z).z_q.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))


@pytest.mark.parametrize(
    "name, overrides, bits",
    [
        ("vq", {}, 4.0),
        ("mcq", {}, 8.0),
        ("mcq", dict(num_codebooks=4, codebook_size=4096), 48.0),
        ("rq", {}, 12.0),
        ("rq", dict(shared_codebook=True, depth=5), 20.0),
        ("lfq", {}, 8.0),
        ("fsq", {}, 2 * math.log2(200)),
        ("fsq", dict(levels=[8, 5, 5, 5], num_codebooks=1), math.log2(1000)),
        ("fsq", dict(levels=[8, 8, 4], num_codebooks=3), 24.0),
    ],
)
def test_bits_per_token(name: str, overrides: dict, bits: float) -> None:
    assert small(name, **overrides).bits_per_token == pytest.approx(bits)


# ---- FSQ ---------------------------------------------------------------------------------------------------
def test_fsq_values_on_grid_and_index_formula() -> None:
    q = FiniteScalarQuantizer(levels=[5, 8]).eval()
    sweep = torch.linspace(-6, 6, 81)
    out = q(torch.cartesian_prod(sweep, sweep)[None])
    v5, v8 = out.z_q[0, :, 0], out.z_q[0, :, 1]
    # Every grid value appears (the sweep covers the whole range) and nothing else does: exact equality.
    assert sorted(set(v5.tolist())) == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert sorted(set(v8.tolist())) == [-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75]
    idx = out.indices[0, :, 0]
    assert int(idx.min()) == 0 and int(idx.max()) == 5 * 8 - 1
    # index = digit_0 + L_0 * digit_1 with digit = value * (L // 2) + L // 2
    expected = (v5 * 2 + 2).long() + 5 * (v8 * 4 + 4).long()
    assert torch.equal(idx, expected)
    assert q.bits_per_token == pytest.approx(math.log2(40))


def test_fsq_is_monotone_per_channel() -> None:
    q = FiniteScalarQuantizer(levels=[7]).eval()
    z = torch.linspace(-5, 5, 500)[None, :, None]
    values = q(z).z_q[0, :, 0]
    assert (values[1:] >= values[:-1]).all()
    assert float(values[0]) == -1.0 and float(values[-1]) == 1.0


def grid_preimage(q: FiniteScalarQuantizer, digits: torch.Tensor) -> torch.Tensor:
    """Inputs z whose FSQ bounding lands (almost) exactly on the integer grid point digit - L // 2."""
    lv = torch.tensor(q.levels, dtype=torch.float64)
    target = digits.double() - (lv // 2)
    half = (lv - 1) * (1 + 1e-3) / 2
    offset = torch.where(lv % 2 == 0, 0.5, 0.0)
    return (torch.atanh((target + offset) / half) - torch.atanh(offset / half)).float()


def test_fsq_indices_exact_above_2_pow_24(monkeypatch: pytest.MonkeyPatch) -> None:
    # The per-code usage tracker of a 2^27-code FSQ costs 12 bytes per code (1.5 GiB) and O(vocab) time per
    # forward (reported to the lead); it plays no part in the index arithmetic, so here it gets one slot.
    monkeypatch.setattr(fsq_module, "UsageTracker", lambda n, k, window: UsageTracker(n, 1, window))
    levels = [8] * 9  # 2^27 codes: float32 cannot hold every index exactly
    q = FiniteScalarQuantizer(levels=levels).eval()
    assert q.codebook_sizes == [2**27] and q.bits_per_token == 27.0
    digits = torch.randint(0, 8, (1, 512, 9))
    digits[0, 0] = 7  # the largest index, 2^27 - 1
    digits[0, 1] = torch.tensor([1] + [7] * 8)  # an odd index far above 2^24
    out = q(grid_preimage(q, digits))
    expected = [sum(int(d) * 8**i for i, d in enumerate(row)) for row in digits[0]]
    assert out.indices[0, :, 0].tolist() == expected
    assert expected[0] == 2**27 - 1 and expected[1] % 2 == 1 and expected[1] > 2**24
    torch.testing.assert_close(out.z_q, (digits - 4).float() / 4, rtol=0, atol=0)
    torch.testing.assert_close(q.decode(out.indices), out.z_q, rtol=0, atol=0)


def test_fsq_level_two_works() -> None:
    q = FiniteScalarQuantizer(levels=[2, 2, 3]).eval()
    out = q(torch.randn(2, 50, 3) * 3)
    assert torch.isfinite(out.z_q).all()
    assert set(out.z_q[..., 0].unique().tolist()) == {-1.0, 0.0}
    assert set(out.indices.unique().tolist()) <= set(range(12))
    torch.testing.assert_close(q.decode(out.indices), out.z_q)


# ---- MCQ ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [True, False])
def test_mcq_chunks_are_independent(normalize: bool) -> None:
    n, c, k = 4, 3, 8
    q = build_quantizer("mcq", dim=n * c, num_codebooks=n, codebook_size=k, normalize=normalize).eval()
    z = torch.randn(2, 5, n * c)
    base = q(z)
    codes = q.codebooks.codes()  # (n, K, c)
    for i in range(n):
        # Put chunk i exactly on a code different from the one it had: code i must become that code.
        target = (base.indices[..., i] + 1) % k
        z2 = z.clone()
        z2[..., i * c : (i + 1) * c] = codes[i][target]
        out = q(z2)
        assert torch.equal(out.indices[..., i], target)
        others = [j for j in range(n) if j != i]
        assert torch.equal(out.indices[..., others], base.indices[..., others])
        keep = torch.ones(n * c, dtype=torch.bool)
        keep[i * c : (i + 1) * c] = False
        assert torch.equal(out.z_q[..., keep], base.z_q[..., keep])


def test_mcq_uses_one_codebook_per_chunk() -> None:
    q = build_quantizer("mcq", dim=6, num_codebooks=3, codebook_size=5, normalize=False).eval()
    z = torch.randn(2, 7, 6)
    out = q(z)
    codes = q.codebooks.codes()
    for i in range(3):
        chunk = z[..., 2 * i : 2 * i + 2].reshape(-1, 2)
        brute = torch.cdist(chunk, codes[i]).argmin(-1)
        assert torch.equal(out.indices[..., i].reshape(-1), brute)


# ---- RQ ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("code_scale", [0.3, 1.0, 3.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_rq_error_never_grows_with_depth(shared: bool, code_scale: float, seed: int) -> None:
    torch.manual_seed(seed)
    q = ResidualQuantizer(dim=6, depth=5, codebook_size=12, shared_codebook=shared).eval()
    with torch.no_grad():
        for book in q.codebooks:  # random codebooks, including codes far larger than the residuals
            book.embed.copy_(torch.randn_like(book.embed) * code_scale)
    z = torch.randn(4, 16, 6)
    sums = q.partial_reconstructions(z)
    assert len(sums) == 5
    errors = torch.stack(
        [torch.linalg.vector_norm(z, dim=-1)] + [torch.linalg.vector_norm(z - s, dim=-1) for s in sums]
    )
    assert (errors[1:] <= errors[:-1] + 1e-5).all(), errors
    assert (errors[-1] < errors[0]).any()  # and it does reduce the error somewhere
    torch.testing.assert_close(sums[-1], q(z).z_q)


def test_rq_indices_follow_the_residual_recursion() -> None:
    q = ResidualQuantizer(dim=4, depth=3, codebook_size=8, zero_code=False).eval()
    z = torch.randn(1, 10, 4)
    out = q(z)
    residual = z[0]
    for d in range(3):
        codes = q.codebooks[d].codes()[0]
        brute = torch.cdist(residual, codes).argmin(-1)
        assert torch.equal(out.indices[0, :, d], brute)
        residual = residual - codes[brute]


def test_rq_shared_codebook_has_one_codebook() -> None:
    shared = ResidualQuantizer(dim=4, depth=3, codebook_size=8, shared_codebook=True)
    per_depth = ResidualQuantizer(dim=4, depth=3, codebook_size=8)
    assert len(shared.codebooks) == 1 and len(per_depth.codebooks) == 3
    assert shared.bits_per_token == per_depth.bits_per_token == 9.0


# ---- LFQ ---------------------------------------------------------------------------------------------------
def test_lfq_index_bit_order_first_channel_is_msb() -> None:
    q = LookupFreeQuantizer(dim=8, num_codebooks=2, scale=0.5).eval()
    #                  group 0: 1 0 0 1 -> 9          group 1: 0 1 1 1 -> 7
    z = torch.tensor([[[0.3, -0.2, -1.0, 2.0, -0.1, 0.4, 0.5, 0.01]]])
    out = q(z)
    assert out.indices.tolist() == [[[9, 7]]]
    assert out.z_q.tolist() == [[[0.5, -0.5, -0.5, 0.5, -0.5, 0.5, 0.5, 0.5]]]
    decoded = q.decode(torch.tensor([[[1, 8]]]))  # 0001, 1000
    assert decoded.tolist() == [[[-0.5, -0.5, -0.5, 0.5, 0.5, -0.5, -0.5, -0.5]]]


def hand_entropy_loss(x: torch.Tensor, group_bits: int, scale: float, inv_temperature: float) -> torch.Tensor:
    """x (M, G, g): the documented entropy loss computed the slow way, code by code."""
    # Codes in index order; first channel = most significant bit.
    codes = torch.tensor(
        [
            [scale if (k >> (group_bits - 1 - j)) & 1 else -scale for j in range(group_bits)]
            for k in range(2**group_bits)
        ]
    )
    per_group = []
    for g in range(x.shape[1]):
        dist = ((x[:, g, None, :] - codes[None]) ** 2).sum(-1)  # (M, 2^g)
        p = torch.softmax(-dist * inv_temperature, dim=-1)
        token_entropy = -(p * torch.log(p)).sum(-1).mean()
        mean_p = p.mean(0)
        batch_entropy = -(mean_p * torch.log(mean_p)).sum()
        per_group.append(token_entropy - batch_entropy)
    return torch.stack(per_group).mean()


@pytest.mark.parametrize("scale, inv_temperature", [(1.0, 100.0), (1.0, 2.0), (0.5, 5.0)])
def test_lfq_entropy_loss_matches_direct_computation(scale: float, inv_temperature: float) -> None:
    q = LookupFreeQuantizer(dim=6, num_codebooks=2, scale=scale, inv_temperature=inv_temperature)
    x = torch.randn(7, 2, 3, dtype=torch.float64) * 0.3
    expected = hand_entropy_loss(x, 3, scale, inv_temperature)
    torch.testing.assert_close(q.entropy_loss(x.float()), expected.float(), rtol=1e-4, atol=1e-5)


def test_lfq_training_loss_is_commitment_plus_entropy() -> None:
    q = LookupFreeQuantizer(
        dim=4, num_codebooks=2, entropy_weight=0.1, commitment_weight=0.25, inv_temperature=3.0
    )
    z = torch.randn(2, 5, 4)
    x = z.reshape(10, 2, 2)
    commit = (z - torch.where(z > 0, 1.0, -1.0)).pow(2).mean()
    entropy_term = hand_entropy_loss(x.double(), 2, 1.0, 3.0).float()
    torch.testing.assert_close(q.train()(z).loss, 0.25 * commit + 0.1 * entropy_term, rtol=1e-4, atol=1e-6)
    # No entropy term outside training (it is a training regulariser over the batch).
    torch.testing.assert_close(q.eval()(z).loss, 0.25 * commit)


def test_lfq_index_is_nearest_code() -> None:
    q = LookupFreeQuantizer(dim=6, num_codebooks=2).eval()
    z = torch.randn(3, 8, 6)
    out = q(z)
    codes = q.decode(torch.arange(8).view(1, 8, 1).expand(1, 8, 2))[0, :, :3]  # all 8 codes of group 0
    for g in range(2):
        chunk = z[..., 3 * g : 3 * g + 3].reshape(-1, 3)
        assert torch.equal(torch.cdist(chunk, codes).argmin(-1), out.indices[..., g].reshape(-1))


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
    (z_grad,) = torch.autograd.grad(
        0.25 * (F.normalize(z.reshape(-1, 4), dim=-1) - e.detach()).pow(2).mean(), z
    )
    torch.testing.assert_close(z.grad, z_grad)


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


@pytest.mark.parametrize("name", DISCRETE)
def test_stats_update_only_in_training(name: str) -> None:
    q = small(name).eval()
    before = q(torch.randn(2, 6, q.dim)).stats
    assert float(before["usage"]) == 0.0 and float(before["dead_codes"]) == 1.0
    state = copy.deepcopy(q.state_dict())
    q(torch.randn(2, 6, q.dim))
    for key, value in q.state_dict().items():
        assert torch.equal(value, state[key]), key
    after = q.train()(torch.randn(2, 6, q.dim)).stats
    assert float(after["usage"]) > 0.0


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
    assert (
        max(bmm_spy) <= qbase.SEARCH_BLOCK_ELEMENTS
        and len(bmm_spy) == 65536 * 65536 // qbase.SEARCH_BLOCK_ELEMENTS
    )
    sample = torch.randint(0, 65536, (64,))
    brute = (F.normalize(z[0, sample], dim=-1) @ q.codebooks.codes()[0].T).argmax(-1)
    assert torch.equal(out.indices[0, sample, 0], brute)


# ---- bf16 autocast -----------------------------------------------------------------------------------------
BF16_CASES = [
    ("vq", dict(dim=16, codebook_size=256)),
    ("vq", dict(dim=16, codebook_size=256, normalize=False)),
    ("mcq", dict(dim=16, num_codebooks=4, codebook_size=256)),
    ("rq", dict(dim=16, depth=4, codebook_size=256)),
    ("lfq", dict(dim=8, num_codebooks=2)),
    ("fsq", dict(levels=[8, 6, 5], num_codebooks=2)),
    ("none", dict(dim=8)),
]


@pytest.mark.parametrize("name, kwargs", BF16_CASES)
def test_bf16_autocast_no_nan_same_indices(name: str, kwargs: dict) -> None:
    q = build_quantizer(name, **kwargs).eval()
    z = torch.randn(4, 64, q.dim).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
        out32_in = q(z.float())  # fp32 input under autocast stays fp32 out
    ref = q(z.float())
    assert out.z_q.dtype == torch.bfloat16 and out32_in.z_q.dtype == torch.float32
    assert torch.isfinite(out.z_q.float()).all() and torch.isfinite(out.loss)
    assert torch.equal(out.indices, ref.indices)
    assert torch.equal(out32_in.indices, ref.indices)
    torch.testing.assert_close(out.z_q, ref.z_q.bfloat16())

    # A training step under autocast: finite loss and gradients.
    q.train()
    zt = z.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tout = q(zt)
        total = tout.loss + tout.z_q.float().pow(2).mean()
    assert torch.isfinite(total)
    total.backward()
    assert zt.grad is not None and torch.isfinite(zt.grad.float()).all()
    for p in q.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()
    assert all(torch.isfinite(v).all() for v in tout.stats.values())


def test_bf16_under_autocast_distances_in_fp32() -> None:
    # Many near-ties: a bf16 distance computation would pick different codes for some tokens.
    q = build_quantizer("vq", dim=32, codebook_size=1024, normalize=False).eval()
    z = torch.randn(1, 512, 32).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
    brute = torch.cdist(z[0].double(), q.codebooks.codes()[0].double()).argmin(-1)
    assert (out.indices[0, :, 0] == brute).float().mean() > 0.99


def test_all_small_configs_cover_every_quantizer() -> None:
    # A newly registered quantizer must get a SMALL config (and so the parametrized tests above).
    assert sorted(SMALL) == list_quantizers() == sorted([*DISCRETE, "none"])
