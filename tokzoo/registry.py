"""One registry idiom for every swappable component (quantizers, factorizations, backbones, datasets...).

    QUANTIZERS = Registry("quantizer")

    @QUANTIZERS.register("vq")
    class VectorQuantizer(nn.Module): ...

    QUANTIZERS.build("vq", dim=64)     # unknown names raise ConfigError listing the allowed ones
    QUANTIZERS.names()                 # sorted list of registered names
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from tokzoo.errors import ConfigError


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._factories: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def add(factory: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._factories:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._factories[name] = factory
            return factory

        return add

    def names(self) -> list[str]:
        return sorted(self._factories)

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._factories:
            raise ConfigError(f"unknown {self.kind} '{name}'; allowed: {', '.join(self.names())}")
        return self._factories[name]

    def build(self, name: str, **kwargs: Any) -> Any:
        factory = self.get(name)
        check_kwargs(factory, kwargs, f"{self.kind} '{name}'")
        return factory(**kwargs)

    def __contains__(self, name: str) -> bool:
        return name in self._factories


def check_kwargs(factory: Callable[..., Any], kwargs: dict[str, Any], what: str) -> None:
    """Reject unknown keyword arguments with a message listing the accepted ones."""
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(f"{what} got unknown argument(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}")
    required = [n for n in accepted if params[n].default is inspect.Parameter.empty]
    missing = [n for n in required if n not in kwargs]
    if missing:
        raise ConfigError(f"{what} needs argument(s) {', '.join(missing)}; accepted: {', '.join(accepted)}")
