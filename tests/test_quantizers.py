"""Unit tests of what each quantizer (vq, mcq, rq, lfq, fsq, none) does on its own: argument errors, codes per
token, bits, shape labels, codebook parameters, and the maths of FSQ, MCQ, RQ and LFQ. The shared codebook
machinery and statistics: test_quantizer_codebooks.py; what every quantizer must do (shapes, decode == z_q,
gradients, state_dict, ...): test_contracts.py, on each registry example."""

from __future__ import annotations

import math

import pytest
import torch

import tokzoo.quantizers.fsq as fsq_module
from tokzoo.errors import ConfigError
from tokzoo.quantizers import QUANTIZERS, build_quantizer, list_quantizers
from tokzoo.quantizers.base import UsageTracker
from tokzoo.quantizers.fsq import FiniteScalarQuantizer
from tokzoo.quantizers.lfq import LookupFreeQuantizer
from tokzoo.quantizers.mcq import MultiCodebookQuantizer
from tokzoo.quantizers.rq import ResidualQuantizer
from tokzoo.quantizers.vq import VectorQuantizer


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---- registry ----------------------------------------------------------------------------------------------
def test_list_quantizers() -> None:
    names = list_quantizers()
    assert {"fsq", "lfq", "mcq", "none", "rq", "vq"} <= set(names) and names == sorted(names)


def test_only_none_is_continuous() -> None:
    assert [n for n in list_quantizers() if QUANTIZERS.get(n).continuous] == ["none"]


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


# ---- codes per token, shapes, decode, gradients (the rest of the contract: test_contracts.py) ---------------
@pytest.mark.parametrize(
    "name, kwargs, codes_per_token",
    [
        ("vq", dict(dim=8, codebook_size=16), 1),
        ("mcq", dict(dim=8, num_codebooks=2, codebook_size=16), 2),
        ("rq", dict(dim=8, depth=3, codebook_size=16), 3),
        ("lfq", dict(dim=8, num_codebooks=2), 2),
        ("fsq", dict(levels=[8, 5, 5], num_codebooks=2), 2),
        ("none", dict(dim=8), 0),
    ],
)
def test_codes_per_token(name: str, kwargs: dict, codes_per_token: int) -> None:
    q = build_quantizer(name, **kwargs)
    assert q.num_codes_per_token == codes_per_token
    assert q(torch.randn(3, 5, q.dim)).indices.shape == (3, 5, codes_per_token)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_none_is_the_exact_identity_and_fsq_has_no_loss(dtype: torch.dtype, training: bool) -> None:
    z = torch.randn(3, 5, 8, dtype=dtype)
    assert torch.equal(build_quantizer("none", dim=8).train(training)(z).z_q, z)
    fsq = build_quantizer("fsq", levels=[8, 5, 5], num_codebooks=2).train(training)
    assert float(fsq(torch.randn(3, 5, 6, dtype=dtype)).loss) == 0.0


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("vq", dict(dim=8, codebook_size=16, normalize=False)),
        ("vq", dict(dim=8, codebook_size=16, update="ema")),
        ("mcq", dict(dim=8, num_codebooks=2, codebook_size=16, normalize=False)),
        ("rq", dict(dim=8, depth=3, codebook_size=16, shared_codebook=True)),
        ("rq", dict(dim=8, depth=3, codebook_size=16, update="grad", zero_code=False)),
        ("lfq", dict(dim=8, num_codebooks=2, scale=0.5)),
        ("fsq", dict(levels=[2, 3, 4])),
    ],
)
def test_decode_equals_z_q_in_eval(name: str, kwargs: dict) -> None:
    q = build_quantizer(name, **kwargs)
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


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("lfq", dict(dim=8, num_codebooks=2)),
        ("rq", dict(dim=8, depth=3, codebook_size=16)),
        ("none", dict(dim=8)),
        ("vq", dict(dim=8, codebook_size=16, normalize=False)),
    ],
)
def test_straight_through_is_identity_on_raw_inputs(name: str, kwargs: dict) -> None:
    # No normalisation or bounding in front of the lookup: d(sum z_q)/dz = 1 everywhere.
    q = build_quantizer(name, **kwargs).train()
    z = torch.randn(3, 4, q.dim, requires_grad=True)
    q(z).z_q.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))


def test_fsq_straight_through_passes_the_tanh_bounding() -> None:
    q = build_quantizer("fsq", levels=[8, 5, 5], num_codebooks=2).train()
    z = torch.randn(3, 4, 6, requires_grad=True)
    q(z).z_q.sum().backward()
    assert (z.grad > 0).all()  # through tanh bounding: positive everywhere


@pytest.mark.parametrize(
    "name, kwargs, bits",
    [
        ("vq", dict(dim=8, codebook_size=16), 4.0),
        ("mcq", dict(dim=8, num_codebooks=2, codebook_size=16), 8.0),
        ("mcq", dict(dim=8, num_codebooks=4, codebook_size=4096), 48.0),
        ("rq", dict(dim=8, depth=3, codebook_size=16), 12.0),
        ("rq", dict(dim=8, codebook_size=16, shared_codebook=True, depth=5), 20.0),
        ("lfq", dict(dim=8, num_codebooks=2), 8.0),
        ("fsq", dict(levels=[8, 5, 5], num_codebooks=2), 2 * math.log2(200)),
        ("fsq", dict(levels=[8, 5, 5, 5], num_codebooks=1), math.log2(1000)),
        ("fsq", dict(levels=[8, 8, 4], num_codebooks=3), 24.0),
    ],
)
def test_bits_per_token(name: str, kwargs: dict, bits: float) -> None:
    assert build_quantizer(name, **kwargs).bits_per_token == pytest.approx(bits)


@pytest.mark.parametrize(
    "name, kwargs, label",
    [
        ("vq", dict(dim=8), "1x16384"),
        ("mcq", dict(dim=8, num_codebooks=4, codebook_size=256), "4x256"),
        ("rq", dict(dim=8, depth=3, codebook_size=16), "3x16"),
        ("rq", dict(dim=8, depth=3, codebook_size=16, shared_codebook=True), "3x16"),
        ("lfq", dict(dim=8, num_codebooks=2), "2x16"),
        ("fsq", dict(levels=[8, 5, 5], num_codebooks=2), "2x200"),
        ("none", dict(dim=64), "continuous 64-d"),
    ],
)
def test_shape_label(name: str, kwargs: dict, label: str) -> None:
    assert build_quantizer(name, **kwargs).shape_label == label


@pytest.mark.parametrize(
    "name, kwargs, shapes",
    [
        ("vq", dict(dim=8, codebook_size=16), [(1, 16, 8)]),
        ("vq", dict(dim=8, codebook_size=16, update="ema"), []),  # EMA codebooks are buffers
        ("mcq", dict(dim=8, num_codebooks=2, codebook_size=16), [(2, 16, 4)]),
        ("rq", dict(dim=8, depth=3, codebook_size=16, update="grad"), [(1, 16, 8)] * 3),
        ("rq", dict(dim=8, depth=3, codebook_size=16, update="grad", shared_codebook=True), [(1, 16, 8)]),
        ("rq", dict(dim=8, depth=3, codebook_size=16), []),
        ("lfq", dict(dim=8, num_codebooks=2), []),
        ("fsq", dict(levels=[8, 5, 5]), []),
        ("none", dict(dim=8), []),
    ],
)
def test_codebook_parameters(name: str, kwargs: dict, shapes: list[tuple[int, ...]]) -> None:
    q = build_quantizer(name, **kwargs)
    params = q.codebook_parameters()
    assert [tuple(p.shape) for p in params] == shapes
    embeds = [p for n, p in q.named_parameters() if n.endswith("embed")]
    assert [id(p) for p in params] == [id(p) for p in embeds]  # what model.py used to find by name


def test_vq_is_mcq_with_one_codebook() -> None:
    torch.manual_seed(3)
    vq = build_quantizer("vq", dim=8, codebook_size=32, normalize=False)
    torch.manual_seed(3)
    mcq = build_quantizer("mcq", dim=8, num_codebooks=1, codebook_size=32, normalize=False)
    assert isinstance(vq, VectorQuantizer) and isinstance(vq, MultiCodebookQuantizer)
    assert vq.name == "vq" and "VectorQuantizer" in repr(vq) and vq.codebook_sizes == [32]
    z = torch.randn(2, 5, 8)
    a, b = vq.eval()(z), mcq.eval()(z)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.z_q, b.z_q)
    assert build_quantizer("vq", dim=8).codebook_sizes == [16384]  # vq's own default size
    with pytest.raises(ConfigError, match="num_codebooks"):  # fixed to 1, not configurable
        build_quantizer("vq", dim=8, num_codebooks=2)
    with pytest.raises(ConfigError, match="'vq'"):
        vq(torch.randn(1, 2, 3))  # errors name the vq, not the mcq


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
    q = LookupFreeQuantizer(dim=4, num_codebooks=2, entropy_weight=0.1, commitment_weight=0.25, inv_temperature=3.0)
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
