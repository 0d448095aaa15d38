"""Linear factorization: one nn.Linear from in_dim to out_dim (the down- or the up-projection)."""

from __future__ import annotations

from torch import Tensor, nn

from tokzoo.factorization.base import FACTORIZATIONS, check_dims


@FACTORIZATIONS.register("linear", example=dict(in_dim=12, out_dim=4))
class LinearFactorization(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, bias: bool = True):
        super().__init__()
        check_dims("linear", in_dim, out_dim)
        self.in_dim, self.out_dim = in_dim, out_dim
        self.proj = nn.Linear(in_dim, out_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, N, in_dim) -> (B, N, out_dim)
        return self.proj(x)
