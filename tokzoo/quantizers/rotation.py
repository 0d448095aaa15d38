"""The straight-through estimator and its rotation-trick variant (Fifty et al. 2024, "Restructuring Vector
Quantization with the Rotation Trick"), shared by the codebook quantizers (vq, mcq, rq).

Plain straight-through: the forward value is the code q, the gradient w.r.t. the encoder output e is the identity.
Rotation trick (the paper's q~ = sg[lambda R] e, both factors treated as constants): lambda = ||q|| / ||e|| and

    R = I - 2 r r^T + 2 q^ e^^T,    e^ = e / ||e||,  q^ = q / ||q||,  r = (e^ + q^) / ||e^ + q^||,

the rotation (a product of two Householder reflections) that takes e^ to q^, so lambda R e = q. The forward value
is unchanged; the gradient becomes dL/de = lambda R^T dL/dq, which carries the angle between e and its code.
R is never built: R e = e - 2 r (r . e) + 2 q^ (e^ . e) costs O(d) per vector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Below this norm a vector has no direction to rotate: such rows keep the identity gradient.
TINY_NORM = 1e-6


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1, keepdim=True)  # row-wise inner product (..., 1)


def straight_through(x: Tensor, q: Tensor, rotation_trick: bool = False) -> Tensor:
    """x (..., d) the input as searched, q (..., d) its code -> the value of q with a gradient for x only.

    With rotation_trick=False this is exactly x + (q - x).detach() (the quantizers' historical form, kept
    bit-identical). With rotation_trick=True the value is the same tensor (bit for bit) and the gradient w.r.t.
    x is lambda R^T g instead of g.
    """
    plain = x + (q - x).detach()
    if not rotation_trick:
        return plain
    rotated = rotate_onto(x, q.detach())
    # value: plain + (a - a) = plain exactly; gradient: that of `rotated` alone
    return plain.detach() + (rotated - rotated.detach())


def rotate_onto(e: Tensor, q: Tensor) -> Tensor:
    """lambda R e with lambda, R computed from detached e and q (so only the final product depends on e).

    e, q: (..., d). Rows where e or q is (near) zero fall back to e itself (identity gradient).
    """
    # e, q: (..., d); norms: (..., 1)
    e_det = e.detach()
    e_norm = e_det.norm(dim=-1, keepdim=True)
    q_norm = q.norm(dim=-1, keepdim=True)
    e_hat = e_det / e_norm.clamp_min(TINY_NORM)
    q_hat = q / q_norm.clamp_min(TINY_NORM)
    # r = 0 when e^ = -q^; the formula still maps e^ to q^ then (R e = e + 2 q^ ||e|| = -e).
    r = F.normalize(e_hat + q_hat, dim=-1, eps=TINY_NORM)
    scale = q_norm / e_norm.clamp_min(TINY_NORM)
    rotated = scale * (e - 2 * r * _dot(r, e) + 2 * q_hat * _dot(e_hat, e))
    degenerate = (e_norm < TINY_NORM) | (q_norm < TINY_NORM)
    return torch.where(degenerate, e, rotated)
