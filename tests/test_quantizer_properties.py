"""Property tests (hypothesis) for the quantizer invariants over random sizes of each quantizer: shapes, index
ranges, decode == z_q in eval mode (component_checks.check_invariants, which the contract tests also run on every
registry example), bits per token, FSQ grids and RQ's non-increasing error."""

from __future__ import annotations

import math

import torch
from component_checks import check_invariants
from hypothesis import given, settings
from hypothesis import strategies as st

from tokzoo.quantizers import build_quantizer

SETTINGS = settings(max_examples=25, deadline=None)
batch = st.integers(1, 3)
tokens = st.integers(1, 6)
seeds = st.integers(0, 2**16)


@SETTINGS
@given(
    b=batch,
    n=tokens,
    num_codebooks=st.integers(1, 4),
    chunk=st.integers(1, 4),
    size=st.integers(1, 32),
    normalize=st.booleans(),
    update=st.sampled_from(["grad", "ema"]),
    seed=seeds,
)
def test_mcq_properties(b, n, num_codebooks, chunk, size, normalize, update, seed) -> None:
    q = build_quantizer(
        "mcq",
        dim=num_codebooks * chunk,
        num_codebooks=num_codebooks,
        codebook_size=size,
        normalize=normalize,
        update=update,
    )
    assert q.codebook_sizes == [size] * num_codebooks
    assert q.bits_per_token == num_codebooks * math.log2(size)
    check_invariants(q, b, n, seed)


@SETTINGS
@given(b=batch, n=tokens, dim=st.integers(1, 12), size=st.integers(1, 64), normalize=st.booleans(), seed=seeds)
def test_vq_properties(b, n, dim, size, normalize, seed) -> None:
    q = build_quantizer("vq", dim=dim, codebook_size=size, normalize=normalize)
    assert q.codebook_sizes == [size] and q.bits_per_token == math.log2(size)
    z_q = check_invariants(q, b, n, seed)
    if normalize:  # cosine codebooks hand back unit-norm codes
        torch.testing.assert_close(z_q.norm(dim=-1), torch.ones(b, n))


@SETTINGS
@given(
    b=batch,
    n=tokens,
    dim=st.integers(1, 8),
    depth=st.integers(1, 4),
    size=st.integers(1, 16),
    shared=st.booleans(),
    update=st.sampled_from(["grad", "ema"]),
    seed=seeds,
)
def test_rq_properties(b, n, dim, depth, size, shared, update, seed) -> None:
    q = build_quantizer(
        "rq",
        dim=dim,
        depth=depth,
        codebook_size=size,
        shared_codebook=shared,
        update=update,
        restart_dead_after=1,
    )
    assert q.codebook_sizes == [size] * depth
    assert q.bits_per_token == depth * math.log2(size)
    check_invariants(q, b, n, seed)
    # quantization error never grows with depth (code 0 is pinned to zero)
    z = torch.randn(b, n, dim)
    errors = [z.norm(dim=-1)] + [(z - s).norm(dim=-1) for s in q.eval().partial_reconstructions(z)]
    for before, after in zip(errors, errors[1:]):
        assert (after <= before + 1e-5).all()


@SETTINGS
@given(
    b=batch,
    n=tokens,
    num_codebooks=st.integers(1, 3),
    bits=st.integers(1, 6),
    scale=st.sampled_from([0.5, 1.0, 2.0]),
    seed=seeds,
)
def test_lfq_properties(b, n, num_codebooks, bits, scale, seed) -> None:
    q = build_quantizer("lfq", dim=num_codebooks * bits, num_codebooks=num_codebooks, scale=scale)
    assert q.codebook_sizes == [2**bits] * num_codebooks
    assert q.bits_per_token == num_codebooks * bits
    z_q = check_invariants(q, b, n, seed)
    assert set(z_q.unique().tolist()) <= {-scale, scale}


@SETTINGS
@given(
    b=batch,
    n=tokens,
    levels=st.lists(st.integers(2, 9), min_size=1, max_size=4),
    num_codebooks=st.integers(1, 3),
    scale=st.sampled_from([0.5, 1.0, 4.0]),
    seed=seeds,
)
def test_fsq_properties(b, n, levels, num_codebooks, scale, seed) -> None:
    q = build_quantizer("fsq", levels=levels, num_codebooks=num_codebooks)
    vocab = math.prod(levels)
    assert q.dim == len(levels) * num_codebooks
    assert q.codebook_sizes == [vocab] * num_codebooks
    assert math.isclose(q.bits_per_token, num_codebooks * math.log2(vocab))
    z_q = check_invariants(q, b, n, seed, scale)
    # every value lies on its channel's grid: integer multiples of 1 / (L // 2) in [-(L // 2), L - 1 - L // 2]
    lv = torch.tensor(levels * num_codebooks)
    steps = z_q * (lv // 2)
    assert torch.equal(steps, steps.round())
    assert (steps >= -(lv // 2)).all() and (steps <= lv - 1 - lv // 2).all()
    assert float(q.eval()(torch.randn(b, n, q.dim)).loss) == 0.0
