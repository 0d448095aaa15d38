"""The sweep file: its format (`name`, `base` or `ablation` + `variant`, `space`, `objectives`, `sampler`, `pruner`,
`n_trials`, `storage`, `heartbeat`, `retries`), its checks at load time, and the resolved trial configs it implies.

Objectives are checked against the metric catalogue (tokzoo.catalogue): an unknown metric or a direction that
contradicts the catalogue fails here, before any study is opened.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from tokzoo import catalogue
from tokzoo.config import defaults, flatten, load_variants, load_yaml, merge, parse_overrides, resolve
from tokzoo.errors import ConfigError

SWEEP_KEYS = {
    "name", "description", "base", "ablation", "variant", "space", "objectives", "sampler", "pruner",
    "n_trials", "storage", "heartbeat", "retries",
}  # fmt: skip
SAMPLERS = ("grid", "tpe", "random", "nsga2")
# The one pruner map: the sweep file's names, and what both the sweep and the trial process build from them.
PRUNER_CLASSES: dict[str, type[optuna.pruners.BasePruner]] = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
}
PRUNERS = ("none", *PRUNER_CLASSES)
DIRECTIONS = ("minimize", "maximize")


@dataclass
class Param:
    """One searched config key (dotted), with an optional condition on other keys of the trial's config."""

    name: str
    kind: str  # categorical | int | float
    choices: list[Any] | None = None
    options: dict[str, Any] | None = None  # categorical choices given as a mapping: label -> value set at `name`
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    when: dict[str, list[Any]] = field(default_factory=dict)

    def distribution(self) -> BaseDistribution:
        if self.kind == "categorical":
            return CategoricalDistribution(self.choices)
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return FloatDistribution(float(self.low), float(self.high), log=self.log, step=self.step)

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, self.choices)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def example(self) -> Any:
        return (
            self.value(self.choices[0])
            if self.kind == "categorical"
            else (int(self.low) if self.kind == "int" else self.low)
        )

    def value(self, suggested: Any) -> Any:
        """What the config gets for a suggested value (the mapped value for a labelled choice)."""
        return self.options[suggested] if self.options is not None else suggested

    def grid_values(self) -> list[Any]:
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int" and not self.log:
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        raise ConfigError(
            f"space key '{self.name}': the grid sampler needs categorical choices or a linear int range; "
            f"use type: categorical with explicit choices"
        )

    def active(self, config: dict[str, Any]) -> bool:
        return all(get_dotted(config, key) in values for key, values in self.when.items())


@dataclass
class Objective:
    metric: str
    direction: str
    fallback: Objective | None = None


@dataclass
class SweepSpec:
    name: str
    path: Path
    base: dict[str, Any]  # merged run config (defaults + base), before parameters and overrides
    overrides: dict[str, Any]  # command-line dot-list, applied after the parameters
    params: list[Param]
    objectives: list[Objective]
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    n_trials: int
    storage: str  # an RDB URL (sqlite:///, postgresql://...) or an absolute journal file path
    heartbeat_interval: int = 10
    grace_period: int = 60
    retries: int = 2

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def trial_config(self, params: dict[str, Any]) -> dict[str, Any]:
        """The resolved run config of a trial: base, then the trial's parameters, then the overrides."""
        return resolve(merge(self.apply(params), self.overrides))

    def apply(self, params: dict[str, Any]) -> dict[str, Any]:
        """The base with the trial's parameters merged in, in file order (unresolved)."""
        config = self.base
        by_name = {p.name: p for p in self.params}
        for name, value in params.items():
            config = merge(config, nest({name: by_name[name].value(value)}))
        return config


def get_dotted(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"model.quantizer.dim": 8} -> {"model": {"quantizer": {"dim": 8}}}."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _number(where: str, spec: dict, key: str, kind: type, required: bool = True) -> Any:
    value = spec.get(key)
    if value is None and not required:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and not float(value).is_integer())
    ):
        raise ConfigError(
            f"space key '{where}': '{key}' must be {'an integer' if kind is int else 'a number'}, got {value!r}"
        )
    return kind(value)


def parse_param(name: str, spec: Any) -> Param:
    if not isinstance(spec, dict) or spec.get("type") not in ("categorical", "int", "float"):
        raise ConfigError(
            f"space key '{name}' must be a mapping with type: categorical (choices: [...]), int (low, high, log, "
            f"step) or float (low, high, log); got {spec!r}"
        )
    allowed = (
        {"type", "when", "choices"} if spec["type"] == "categorical" else {"type", "when", "low", "high", "log", "step"}
    )
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ConfigError(
            f"space key '{name}' has unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )
    when = spec.get("when") or {}
    if not isinstance(when, dict):
        raise ConfigError(f"space key '{name}': 'when' must map config keys to a value or a list of values")
    when = {str(k): (v if isinstance(v, list) else [v]) for k, v in when.items()}
    if spec["type"] == "categorical":
        choices = spec.get("choices")
        if isinstance(choices, dict) and choices:  # labelled choices: Optuna sees the labels, the config the values
            options = {str(k): v for k, v in choices.items()}
            return Param(name, "categorical", choices=list(options), options=options, when=when)
        if not isinstance(choices, list) or not choices:
            raise ConfigError(
                f"space key '{name}': 'choices' must be a non-empty list, or a mapping label -> value (e.g. "
                f"'2x8192': {{num_codebooks: 2, codebook_size: 8192}})"
            )
        for c in choices:
            if c is not None and not isinstance(c, (bool, int, float, str)):
                raise ConfigError(
                    f"space key '{name}': choice {c!r} must be a number, string, bool or null "
                    f"(Optuna stores choices as plain values)"
                )
        return Param(name, "categorical", choices=choices, when=when)
    kind = int if spec["type"] == "int" else float
    low, high = _number(name, spec, "low", kind), _number(name, spec, "high", kind)
    step = _number(name, spec, "step", kind, required=False)
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"space key '{name}': 'log' must be true or false, got {log!r}")
    if low > high or (log and low <= 0) or (log and step not in (None, 1)) or (step is not None and step <= 0):
        raise ConfigError(
            f"space key '{name}': need low <= high, low > 0 with log: true, a positive step, and no "
            f"step other than 1 with log: true; got {spec!r}"
        )
    return Param(name, spec["type"], low=low, high=high, step=step, log=log, when=when)


TRIAL_REPORTS = ("val/", "val_raw/", "perf/images_per_sec")  # what runner.fit_variant returns as a trial's metrics


def parse_objective(spec: Any, where: str) -> Objective:
    """One objective (and its fallback chain); the metric must be in the catalogue, and the direction agree with
    it (the catalogue's is taken when the file gives none)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("metric"), str):
        raise ConfigError(
            f"{where} must be a mapping with 'metric' (e.g. val/psnr) and, for a metric with no better direction "
            f"in the catalogue, 'direction' (minimize|maximize); got {spec!r}"
        )
    direction = spec.get("direction")
    if direction is not None and direction not in DIRECTIONS:
        raise ConfigError(f"{where}: direction '{direction}' is not one of {', '.join(DIRECTIONS)}")
    unknown = sorted(set(spec) - {"metric", "direction", "fallback"})
    if unknown:
        raise ConfigError(f"{where} has unknown field(s) {', '.join(unknown)}; allowed: metric, direction, fallback")
    name = spec["metric"]
    entry = catalogue.lookup(name)
    if entry is None:
        raise ConfigError(f"{where}: unknown metric '{name}'; known metrics: {', '.join(catalogue.CATALOGUE)}")
    if not name.startswith(TRIAL_REPORTS):
        raise ConfigError(
            f"{where}: metric '{name}' is logged during training, but a trial reports only its final "
            f"{' and '.join(TRIAL_REPORTS)}* metrics; pick one of those"
        )
    if direction is None:
        if entry.direction is None:
            raise ConfigError(
                f"{where}: metric '{name}' has no better direction in the catalogue (a diagnostic); "
                f"give direction: minimize or direction: maximize"
            )
        direction = entry.direction
    elif entry.direction is not None and direction != entry.direction:
        raise ConfigError(
            f"{where}: metric '{name}' is better {'higher' if entry.higher_is_better else 'lower'}, so its "
            f"direction is '{entry.direction}', not '{direction}'; set direction: {entry.direction} or omit it"
        )
    fallback = parse_objective(spec["fallback"], f"{where}.fallback") if spec.get("fallback") else None
    return Objective(name, direction, fallback)


def load_sweep(
    path: str | Path, overrides: Sequence[str] = (), storage: str | None = None, n_trials: int | None = None
) -> SweepSpec:
    """Read and check a sweep file; the base config with the overrides is resolved once here to fail early."""
    path = Path(path).resolve()
    data = load_yaml(path)
    unknown = sorted(set(data) - SWEEP_KEYS)
    if unknown:
        raise ConfigError(
            f"sweep file '{path}' has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(SWEEP_KEYS))}"
        )
    name = str(data.get("name") or path.stem)
    if "ablation" in data:
        if "base" in data or not isinstance(data.get("variant"), str):
            raise ConfigError(f"sweep file '{path}': give either 'base' or 'ablation' + 'variant' (a variant name)")
        ablation = path.parent / data["ablation"]
        _, variants = load_variants(ablation)
        found = [v for v in variants if v.name == data["variant"]]
        if not found:
            raise ConfigError(
                f"sweep file '{path}': ablation '{ablation}' has no variant '{data['variant']}'; "
                f"variants: {', '.join(v.name for v in variants)}"
            )
        base = found[0].config
    else:
        raw = data.get("base") or {}
        if isinstance(raw, str):
            raw = load_yaml(path.parent / raw)
        if not isinstance(raw, dict):
            raise ConfigError(f"sweep file '{path}': 'base' must be a run config mapping or a path to one")
        base = merge(defaults(), raw)
    over = parse_overrides(list(overrides))

    space = data.get("space")
    if not isinstance(space, dict) or not space:
        raise ConfigError(
            f"sweep file '{path}': 'space' must map dotted config keys to search ranges, e.g. "
            f"model.quantizer.num_codebooks: {{type: categorical, choices: [1, 2, 4]}}"
        )
    params = [parse_param(str(k), v) for k, v in space.items()]
    clash = sorted(k for k in flatten(over) if any(k == p.name or k.startswith(p.name + ".") for p in params))
    if clash:
        raise ConfigError(
            f"override(s) {', '.join(clash)} set a searched key; remove them or remove the key from 'space' in '{path}'"
        )
    for p in params:
        merge(base, nest({p.name: p.example()}))  # an unknown key fails here, naming the allowed ones
    resolve(merge(base, over))

    objectives = data.get("objectives")
    if not isinstance(objectives, list) or not objectives:
        raise ConfigError(
            f"sweep file '{path}': 'objectives' must be a non-empty list of {{metric: val/psnr, direction: maximize}}"
        )
    objs = [parse_objective(o, f"objectives[{i}]") for i, o in enumerate(objectives)]

    sampler = data.get("sampler") or {"type": "tpe"}
    if isinstance(sampler, str):
        sampler = {"type": sampler}
    if not isinstance(sampler, dict) or sampler.get("type") not in SAMPLERS:
        raise ConfigError(f"sweep file '{path}': sampler.type must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    pruner = data.get("pruner") or {"type": "none"}
    if isinstance(pruner, str):
        pruner = {"type": pruner}
    if not isinstance(pruner, dict) or pruner.get("type") not in PRUNERS:
        raise ConfigError(f"sweep file '{path}': pruner.type must be one of {', '.join(PRUNERS)}, got {pruner!r}")

    n = n_trials if n_trials is not None else data.get("n_trials")
    if sampler["type"] == "grid":
        if any(p.when for p in params):
            raise ConfigError(f"sweep file '{path}': the grid sampler does not support conditional ('when') keys")
        size = math.prod(len(p.grid_values()) for p in params)
        n = size if n is None else min(int(n), size)  # more would only re-evaluate grid points
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"sweep file '{path}': n_trials must be a positive integer (or pass --n-trials), got {n!r}")

    storage = storage or data.get("storage") or f"{name}.journal"
    if "://" not in storage:
        storage = str((path.parent / storage).resolve())
    interval, grace = _heartbeat(data.get("heartbeat"), path)
    retries = data.get("retries", 2)
    if not isinstance(retries, int) or retries < 0:
        raise ConfigError(f"sweep file '{path}': retries must be a non-negative integer, got {retries!r}")
    return SweepSpec(
        name=name, path=path, base=base, overrides=over, params=params, objectives=objs, sampler=dict(sampler),
        pruner=dict(pruner), n_trials=n, storage=storage, heartbeat_interval=interval, grace_period=grace,
        retries=retries,
    )  # fmt: skip


def _heartbeat(beat: Any, path: Path) -> tuple[int, int]:
    """heartbeat: {interval, grace}, whole seconds (Optuna's RDB heartbeat takes integers). A grace of at least two
    intervals, so that one late beat (a busy host, a slow database) does not fail a live trial."""
    beat = {} if beat is None else beat
    if not isinstance(beat, dict) or set(beat) - {"interval", "grace"}:
        raise ConfigError(f"sweep file '{path}': heartbeat must be a mapping {{interval: S, grace: S}}, got {beat!r}")
    interval, grace = beat.get("interval", 10), beat.get("grace", 60)
    for key, value in (("interval", interval), ("grace", grace)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(
                f"sweep file '{path}': heartbeat.{key} must be a positive whole number of seconds, got {value!r}"
            )
    if grace < 2 * interval:
        raise ConfigError(
            f"sweep file '{path}': heartbeat.grace ({grace} s) must be at least twice heartbeat.interval "
            f"({interval} s), or one late beat would fail a live trial"
        )
    return interval, grace


def resolve_objectives(objectives: list[Objective], config: dict[str, Any]) -> list[dict[str, str]]:
    """Pick, for each objective, the first metric of its fallback chain that this config can produce."""
    out = []
    for obj in objectives:
        chosen, notes = obj, []
        while (why := catalogue.absence(chosen.metric, config)) and chosen.fallback is not None:
            why = why if len(why) <= 120 else why[:117] + "..."  # the run's absent.* tag has the full reason
            notes.append(f"{chosen.metric} absent ({why}); using {chosen.fallback.metric}")
            chosen = chosen.fallback
        out.append(
            {"metric": chosen.metric, "direction": chosen.direction, "requested": obj.metric, "note": "; ".join(notes)}
        )
    return out
