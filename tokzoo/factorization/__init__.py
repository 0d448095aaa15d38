"""Factorizations behind one registry: build_factorization("attention", in_dim=1024, out_dim=64)."""

from tokzoo.factorization import attention, linear  # noqa: F401  (registers each factorization)
from tokzoo.factorization.base import FACTORIZATIONS, build_factorization, list_factorizations

__all__ = ["FACTORIZATIONS", "build_factorization", "list_factorizations"]
