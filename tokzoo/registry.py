"""One registry idiom for every swappable component (quantizers, factorizations, backbones, datasets...).

    QUANTIZERS = Registry("quantizer")

    @QUANTIZERS.register("fsq", example=dict(levels=[8, 5, 5], num_codebooks=2))
    class FiniteScalarQuantizer(nn.Module): ...

    QUANTIZERS.build("fsq", levels=[8, 5])   # unknown names or arguments raise ConfigError listing the allowed ones
    QUANTIZERS.names()                       # sorted list of registered names
    QUANTIZERS.example("fsq")                # small, fast arguments: what the contract tests build it with

An example is a dict of keyword arguments, or, for a component that reads files, a function that writes a tiny
input into a given folder and returns the arguments (`example(name, folder)`). Every component is expected to
have one (tests/test_contracts.py builds each registered name from it), so `example` raises for a name without.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokzoo.errors import ConfigError

Example = dict[str, Any] | Callable[[Path], dict[str, Any]]


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._factories: dict[str, Callable[..., Any]] = {}
        self._examples: dict[str, Example] = {}

    def register(self, name: str, example: Example | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def add(factory: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._factories:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            if isinstance(example, dict):  # a typo in an example fails at import, not in some later test
                check_kwargs(factory, example, f"the example of {self.kind} '{name}'")
            self._factories[name] = factory
            if example is not None:
                self._examples[name] = example
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

    def example(self, name: str, folder: str | Path | None = None) -> dict[str, Any]:
        """Small arguments to build `name` with (a fresh copy); `folder` is where file-reading components write
        their tiny input. Raises ConfigError when the component registered no example."""
        self.get(name)
        if name not in self._examples:
            raise ConfigError(
                f"{self.kind} '{name}' has no example arguments; register it with "
                f"register('{name}', example=dict(...)) so the contract tests can build it"
            )
        example = self._examples[name]
        if not callable(example):
            return copy.deepcopy(example)
        if folder is None:
            raise ConfigError(f"the example of {self.kind} '{name}' writes files: pass example('{name}', folder)")
        return example(Path(folder))

    def __contains__(self, name: str) -> bool:
        return name in self._factories


def accepted_arguments(factory: Callable[..., Any]) -> list[str]:
    params = inspect.signature(factory).parameters.values()
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def check_kwargs(factory: Callable[..., Any], kwargs: dict[str, Any], what: str) -> None:
    """Reject unknown or missing keyword arguments with a message listing the accepted ones."""
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = accepted_arguments(factory)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(f"{what} got unknown argument(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}")
    required = [n for n in accepted if params[n].default is inspect.Parameter.empty]
    missing = [n for n in required if n not in kwargs]
    if missing:
        raise ConfigError(f"{what} needs argument(s) {', '.join(missing)}; accepted: {', '.join(accepted)}")


def signature_without(factory: Callable[..., Any], *names: str) -> inspect.Signature:
    sig = inspect.signature(factory)
    return sig.replace(parameters=[p for n, p in sig.parameters.items() if n not in names])


def preset(factory: Callable[..., Any], **fixed: Any) -> functools.partial:
    """`factory` with `fixed` arguments bound and hidden from its signature, so Registry.build rejects them like
    any unknown argument (a plain functools.partial would let a config override them). For defaults that a
    config may override, use functools.partial itself."""
    bound = functools.partial(factory, **fixed)
    bound.__signature__ = signature_without(factory, *fixed)  # inspect.signature reads this first
    return bound
