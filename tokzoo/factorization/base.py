"""Registry for factorizations: the width changes around the quantizer, (B, N, in_dim) -> (B, N, out_dim)."""

from __future__ import annotations

from torch import nn

from tokzoo.checks import positive_int
from tokzoo.errors import ConfigError
from tokzoo.registry import Registry

FACTORIZATIONS = Registry("factorization")


def build_factorization(name: str, **kwargs) -> nn.Module:
    return FACTORIZATIONS.build(name, **kwargs)


def list_factorizations() -> list[str]:
    return FACTORIZATIONS.names()


def check_dims(name: str, in_dim: int, out_dim: int) -> None:
    positive_int(f"factorization '{name}'", in_dim=in_dim, out_dim=out_dim)


@FACTORIZATIONS.register("none", example=dict(in_dim=8, out_dim=8))
class IdentityFactorization(nn.Identity):
    """No width change: only valid where in_dim == out_dim (e.g. the continuous CLIP baseline)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        check_dims("none", in_dim, out_dim)
        if in_dim != out_dim:
            raise ConfigError(
                f"factorization 'none' needs in_dim == out_dim, got {in_dim} -> {out_dim}; "
                f"use 'linear' or 'attention', or make the quantizer dim equal the encoder width"
            )
        self.in_dim, self.out_dim = in_dim, out_dim
