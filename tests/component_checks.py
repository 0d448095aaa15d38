"""Checks shared by the contract tests (test_contracts.py) and the per-component tests, which run them on their
own configurations (test_quantizer_properties.py on random sizes, test_quantizers.py on larger codebooks).
Not a test module itself."""

from __future__ import annotations

import pytest
import torch

import tokzoo.backbones.vit as vit_module

__test__ = False
STAT_KEYS = ("usage", "perplexity", "dead_codes")


def tokens(q, n: int) -> int:
    """n tokens per sample, or the count the quantizer requires (msrq: its square grid, `num_tokens`)."""
    return n if q.num_tokens is None else q.num_tokens


def check_invariants(q, b: int, n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Shapes, index ranges and decode == z_q (eval) for one random input of a discrete quantizer; returns z_q."""
    torch.manual_seed(seed)
    z = torch.randn(b, n, q.dim) * scale
    q.train()
    q(z)  # a training step first: trackers / EMA codebooks move, and the invariants must still hold
    q.eval()
    out = q(z)
    c = len(q.codebook_sizes)
    assert out.z_q.shape == (b, n, q.dim) and out.z_q.dtype == z.dtype
    assert out.indices.shape == (b, n, c) and out.indices.dtype == torch.int64
    assert torch.isfinite(out.z_q).all() and torch.isfinite(out.loss)
    check_index_ranges(q, out.indices)
    torch.testing.assert_close(q.decode(out.indices), out.z_q, rtol=1e-5, atol=1e-5)
    for key in STAT_KEYS:
        assert key in out.stats
    assert 0.0 <= float(out.stats["usage"]) <= 1.0
    return out.z_q


def check_index_ranges(q, indices: torch.Tensor) -> None:
    for c, size in enumerate(q.codebook_sizes):
        assert 0 <= int(indices[..., c].min()) and int(indices[..., c].max()) < size, (c, size)


def check_bf16_autocast(q) -> None:
    """Under bf16 autocast: bf16 out for bf16 in, fp32 out for fp32 in, the fp32 indices, finite training step."""
    q.eval()
    z = torch.randn(4, tokens(q, 64), q.dim).bfloat16()
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


def count_checkpoint_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """[n]: how many blocks ran under activation checkpointing (vit.run_blocks, used by the ViTs and the text
    tower) from now on."""
    calls = [0]
    real = vit_module.checkpoint

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(vit_module, "checkpoint", counting)
    return calls
