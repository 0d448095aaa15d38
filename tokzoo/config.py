"""Config loading, validation and ablation-variant expansion.

A *run config* is a partial override of tokzoo/configs/default.yaml. An *ablation file* has a `base` (a run config,
inline or a path relative to the file) and named `variants`, each a partial override merged onto the base; `seeds`
(optional) runs every variant once per seed, `budgets` (optional, training steps) once per budget. Command-line
dot-list overrides apply to every variant, last; `seeds=[0]` and `budgets=[20,40]` there replace the file's lists,
and `variants=[a,b]` trains only those variants.

Merging rule for component sections (model.encoder/decoder/factorization/quantizer/text/tokenizer): when an override
names a different component (`name:` changes), the section is replaced, not merged, so that keyword arguments of the
old component do not leak into the new one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tokzoo.errors import ConfigError

DEFAULTS_PATH = Path(__file__).parent / "configs" / "default.yaml"
COMPONENT_SECTIONS = ("encoder", "decoder", "factorization", "quantizer", "text", "tokenizer")
OPEN_SECTIONS = {("data", "kwargs"), ("trainer",)} | {("model", c) for c in COMPONENT_SECTIONS}
SUPERVISIONS = ("recon", "contra", "both")
CONTRA_DUPLICATES = ("positive", "negative")  # tokzoo.losses.contrastive.DUPLICATE_MODES (torch-free here)
ABLATION_KEYS = {"name", "base", "variants", "seeds", "budgets", "description"}
LIST_KEYS = ("seeds", "budgets")  # ablation-level lists a dot-list override may replace
AUGMENT_CROPS = ("random", "center")  # tokzoo.data.transforms.CROPS (torch-free here)
AUGMENT_OFF = {"crop": "center", "flip": False, "resize_short": 1.0}  # the val transform, and every split's before
# data.augment's `auto` per dataset: photos get a random crop and a flip; shapes none, since its captions name
# positions (left/right, top/bottom) that a flip would make wrong.
UNAUGMENTED_DATASETS = ("shapes",)


@dataclass
class Variant:
    name: str  # variant name, then "/steps<n>" with budgets, then "/seed<k>" when the ablation lists several seeds
    config: dict[str, Any]  # fully resolved run config
    seed: int
    budget: int | None = None  # trainer.max_steps set by the ablation's `budgets`
    shorter: str | None = None  # the same variant and seed at the next smaller budget (a run it may continue)

    @property
    def config_hash(self) -> str:
        return config_hash(self.config)


def defaults() -> dict[str, Any]:
    return yaml.safe_load(DEFAULTS_PATH.read_text())


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file '{path}' does not exist; pass the path to a YAML file (e.g. ablations/mcq_vs_rq.yaml)"
        )
    try:
        data = yaml.safe_load(path.read_text())  # configs are data: never yaml.load with arbitrary tags
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level, got {type(data).__name__}")
    return data


def merge(base: dict[str, Any], override: dict[str, Any], path: str = "") -> dict[str, Any]:
    """Deep merge of override onto base, checking keys against base (which holds every allowed key)."""
    out = dict(base)
    for key, value in override.items():
        where = f"{path}.{key}" if path else key
        section = tuple(where.split("."))
        parent_open = tuple(path.split(".")) in OPEN_SECTIONS if path else False
        if key not in base and not parent_open:
            allowed = ", ".join(sorted(base))
            raise ConfigError(f"unknown config key '{where}'; allowed keys here: {allowed}")
        old = base.get(key)
        if section[:1] == ("model",) and len(section) == 2 and key in COMPONENT_SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{where}' must be a mapping with a 'name', got {value!r}")
            if "name" in value and isinstance(old, dict) and value["name"] != old.get("name"):
                out[key] = dict(value)  # a different component: replace, do not inherit its arguments
                continue
        if isinstance(old, dict) and isinstance(value, dict):
            out[key] = merge(old, value, where)
        elif isinstance(old, dict) and value is not None and section not in OPEN_SECTIONS:
            raise ConfigError(f"config key '{where}' must be a mapping, got {value!r}")
        else:
            out[key] = value
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """OmegaConf dot-list (`trainer.max_steps=50`) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.path=value, e.g. trainer.max_steps=50")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)), resolve=True)
    except (OmegaConfBaseException, yaml.YAMLError) as err:  # values are parsed as YAML: `{a:b}` fails there
        raise ConfigError(f"cannot parse overrides {overrides}: {' '.join(str(err).split())}") from None


def resolve(config: dict[str, Any]) -> dict[str, Any]:
    """Resolve ${...} interpolations and validate types and combinations; returns a plain dict."""
    try:
        resolved = OmegaConf.to_container(OmegaConf.create(config), resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot resolve config: {err}") from None
    resolved["data"]["augment"] = resolve_augment(resolved["data"])
    validate(resolved)
    return resolved


def resolve_augment(data: dict[str, Any]) -> dict[str, Any]:
    """data.augment with `auto` replaced by the dataset's default, so that params and hash state what ran. null, or
    no key (a config written before data.augment existed): off."""
    section = data.get("augment")
    if section is None:
        return dict(AUGMENT_OFF)
    if not isinstance(section, dict) or set(section) - set(AUGMENT_OFF):
        raise ConfigError(
            f"config key 'data.augment' must be a mapping with keys {', '.join(AUGMENT_OFF)}, or null (off); "
            f"got {section!r}"
        )
    plain = data.get("name") in UNAUGMENTED_DATASETS
    crop, flip = section.get("crop", "auto"), section.get("flip", "auto")
    crop = ("center" if plain else "random") if crop == "auto" else crop
    flip = (not plain) if flip == "auto" else flip
    scale = section.get("resize_short", 1.0)
    if crop not in AUGMENT_CROPS:
        raise ConfigError(f"config key 'data.augment.crop' is {crop!r}; allowed: {', '.join(AUGMENT_CROPS)}, auto")
    if not isinstance(flip, bool):
        raise ConfigError(f"config key 'data.augment.flip' must be true, false or auto, got {flip!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 1.0 <= scale <= 4.0:
        raise ConfigError(
            f"config key 'data.augment.resize_short' must be a number in [1, 4] (the short side as a multiple of "
            f"model.image_size before the crop), got {scale!r}"
        )
    if "augment" in (data.get("kwargs") or {}):
        raise ConfigError("data.kwargs.augment is set; set data.augment instead (it applies to the train split only)")
    if data.get("name") == "shapes" and flip and (data.get("kwargs") or {}).get("captions", "full") == "full":
        raise ConfigError(
            "data.augment.flip=true mirrors the shapes images, but their full captions name positions (left/right); "
            "set data.augment.flip=false, or data.kwargs.captions=object or shape"
        )
    return {"crop": crop, "flip": flip, "resize_short": float(scale)}


def _expect(cfg: dict, key: str, kind: type | tuple[type, ...], *, minimum: float | None = None) -> None:
    section, _, name = key.rpartition(".")
    node = cfg
    for part in section.split(".") if section else []:
        node = node[part]
    value = node[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        names = " or ".join(k.__name__ for k in kinds)
        raise ConfigError(f"config key '{key}' must be {names}, got {value!r}")
    if minimum is not None and value is not None and value < minimum:
        raise ConfigError(f"config key '{key}' must be >= {minimum}, got {value!r}")


def validate(cfg: dict[str, Any]) -> None:
    _expect(cfg, "seed", int)
    _expect(cfg, "output_dir", str)
    _expect(cfg, "checkpoint_every", int, minimum=1)
    _expect(cfg, "model.image_size", int, minimum=8)
    _expect(cfg, "model.embed_dim", int, minimum=1)
    for comp in COMPONENT_SECTIONS:
        section = cfg["model"][comp]
        if not isinstance(section, dict) or not isinstance(section.get("name"), str):
            raise ConfigError(f"config key 'model.{comp}' needs a 'name' naming a registered {comp}")
    if cfg["loss"]["supervision"] not in SUPERVISIONS:
        raise ConfigError(
            f"config key 'loss.supervision' is '{cfg['loss']['supervision']}'; allowed: {', '.join(SUPERVISIONS)}"
        )
    for key in ("l1_weight", "l2_weight", "lpips_weight", "quant_weight", "contra_weight", "gan_weight"):
        _expect(cfg, f"loss.{key}", float, minimum=0.0)
    _expect(cfg, "loss.gan_start", float, minimum=0.0)
    _expect(cfg, "loss.grad_cos_every", int, minimum=0)
    _expect(cfg, "loss.recon_batch_fraction", float)
    fraction = cfg["loss"]["recon_batch_fraction"]
    if not 0 < fraction <= 1:
        raise ConfigError(
            f"config key 'loss.recon_batch_fraction' is {fraction}; it must be in (0, 1] (1 = the whole batch)"
        )
    if cfg["loss"]["contra_duplicates"] not in CONTRA_DUPLICATES:
        raise ConfigError(
            f"config key 'loss.contra_duplicates' is {cfg['loss']['contra_duplicates']!r}; "
            f"allowed: {', '.join(CONTRA_DUPLICATES)}"
        )
    for key in ("lr", "weight_decay", "min_lr_ratio", "disc_lr"):
        _expect(cfg, f"optim.{key}", float, minimum=0.0)
    _expect(cfg, "optim.warmup_steps", int, minimum=0)
    for part in cfg["optim"]["lr_mult"]:
        _expect(cfg, f"optim.lr_mult.{part}", float, minimum=0.0)
    if "lock" in cfg["model"]["text"] and not isinstance(cfg["model"]["text"]["lock"], bool):
        raise ConfigError(f"config key 'model.text.lock' must be true or false, got {cfg['model']['text']['lock']!r}")
    _expect(cfg, "optim.codebook_weight_decay", bool)
    _expect(cfg, "compile", bool)
    _expect(cfg, "data.name", str)
    _expect(cfg, "data.batch_size", int, minimum=1)
    _expect(cfg, "data.num_workers", int, minimum=0)
    for key in ("zero_shot", "retrieval", "linear_probe", "lpips", "rfid"):
        _expect(cfg, f"eval.{key}", bool)
    _expect(cfg, "eval.grid_images", int, minimum=0)
    _expect(cfg, "eval.token_diagnostics", bool)
    _expect(cfg, "eval.stability_images", int, minimum=0)
    _expect(cfg, "eval.stability_psnr_db", (int, float), minimum=0)
    for key in ("steps", "batch_size", "width", "depth", "heads", "head_depth", "train_images", "samples"):
        _expect(cfg, f"eval.generation.{key}", int, minimum=0 if key == "steps" else 1)
    _expect(cfg, "eval.generation.grid_per_class", int, minimum=0)
    for key in ("lr", "temperature", "cfg"):
        _expect(cfg, f"eval.generation.{key}", float, minimum=0.0)
    _expect(cfg, "eval.generation.class_dropout", float, minimum=0.0)
    gen = cfg["eval"]["generation"]
    if gen["class_dropout"] >= 1:
        raise ConfigError(f"config key 'eval.generation.class_dropout' must be < 1, got {gen['class_dropout']}")
    if gen["width"] % gen["heads"]:
        raise ConfigError(
            f"eval.generation.width {gen['width']} is not divisible by eval.generation.heads {gen['heads']}; "
            f"pick heads that divide it"
        )
    if gen["cfg"] > 0 and gen["class_dropout"] == 0:
        raise ConfigError("eval.generation.cfg > 0 needs eval.generation.class_dropout > 0 (the unconditional model)")
    _expect(cfg, "trainer.max_steps", int, minimum=1)
    if "ema" in cfg:  # a config without the section (written before it existed) has no EMA
        _expect(cfg, "ema.decay", float, minimum=0.0)
        if cfg["ema"]["decay"] >= 1:
            raise ConfigError(f"config key 'ema.decay' must be < 1 (0 = off, e.g. 0.9999), got {cfg['ema']['decay']!r}")
        _expect(cfg, "ema.warmup", bool)
        _expect(cfg, "ema.raw_metrics", bool)
    if cfg["loss"]["supervision"] == "contra" and cfg["loss"]["gan_weight"] > 0:
        raise ConfigError("config sets loss.gan_weight > 0 with loss.supervision=contra; a GAN needs reconstruction")


def load_variants(path: str | Path, overrides: list[str] | None = None) -> tuple[str, list[Variant]]:
    """Read a run config or an ablation file; returns (experiment name, resolved variants)."""
    path = Path(path)
    data = load_yaml(path)
    name = path.stem
    over = parse_overrides(overrides or [])
    lists = {key: over.pop(key) for key in LIST_KEYS if key in over}  # `seeds=[0]` on the command line
    chosen = over.pop("variants", None)  # `variants=[a,b]`: train only these of the file's variants
    if "variants" in data or "base" in data:
        unknown = sorted(set(data) - ABLATION_KEYS)
        if unknown:
            raise ConfigError(
                f"ablation file '{path}' has unknown top-level key(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(sorted(ABLATION_KEYS))}"
            )
        name = data.get("name") or name
        base = data.get("base") or {}
        if isinstance(base, str):
            base = load_yaml((path.parent / base) if not Path(base).is_absolute() else base)
        variants = data.get("variants") or {"base": {}}
        if not isinstance(variants, dict):
            raise ConfigError(f"'variants' in '{path}' must be a mapping of variant name -> overrides")
    else:
        base, variants, data = data, {name: {}}, {}
    if chosen is not None:
        unknown = [v for v in chosen if v not in variants] if isinstance(chosen, list) else [chosen]
        if unknown or not chosen:
            raise ConfigError(
                f"variants={chosen!r} on the command line must list variants of '{path}': {', '.join(variants)}"
            )
        variants = {v: variants[v] for v in variants if v in chosen}
    seeds = _int_list("seeds", lists.get("seeds", data.get("seeds")), path, minimum=None)
    budgets = _int_list("budgets", lists.get("budgets", data.get("budgets")), path, minimum=1)

    base_cfg = merge(defaults(), base)
    out = []
    for vname, vover in variants.items():
        if not isinstance(vover, dict):
            raise ConfigError(f"variant '{vname}' in '{path}' must be a mapping of overrides, got {vover!r}")
        cfg = merge(merge(base_cfg, vover), over)
        shorter: dict[int | None, str] = {}  # seed -> label of its run at the previous budget
        for budget in sorted(set(budgets)) if budgets else [None]:
            for seed in seeds or [None]:
                run_cfg = dict(cfg) if seed is None else {**cfg, "seed": seed}
                if budget is not None:
                    run_cfg["trainer"] = {**run_cfg.get("trainer", {}), "max_steps": budget}
                resolved = resolve(run_cfg)
                label = str(vname) if budget is None else f"{vname}/steps{budget}"
                label = label if seed is None or len(seeds) == 1 else f"{label}/seed{seed}"
                out.append(Variant(label, resolved, resolved["seed"], budget, shorter.get(seed)))
                shorter[seed] = label
    if "experiment" in (over.get("tracking") or {}) and over["tracking"]["experiment"]:
        name = over["tracking"]["experiment"]
    elif out and out[0].config["tracking"]["experiment"]:
        name = out[0].config["tracking"]["experiment"]
    return str(name), out


def _int_list(key: str, value: Any, path: Path, minimum: int | None) -> list[int] | None:
    """`seeds` / `budgets`: None, or a non-empty list of integers (budgets at least `minimum`)."""
    if value is None:
        return None
    ok = isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ok or (minimum is not None and min(value) < minimum):
        floor = f" of at least {minimum}" if minimum is not None else ""
        example = "[0,1,2]" if key == "seeds" else "[200,800]"
        raise ConfigError(
            f"'{key}' (in '{path}' or on the command line) must be a non-empty list of integers{floor}, got "
            f"{value!r}; e.g. '{key}={example}'"
        )
    return value


def budget_dependence(config: dict[str, Any]) -> str | None:
    """Why a run at a smaller budget is not the first part of a longer one (None when it is, so a longer budget can
    continue its checkpoint): anything scheduled over trainer.max_steps."""
    ratio = config["optim"]["min_lr_ratio"]
    if ratio < 1:
        return (
            f"the learning rate decays on a cosine to the end of each budget (optim.min_lr_ratio={ratio} < 1), so a "
            f"shorter run is not the start of a longer one; optim.min_lr_ratio=1.0 (warmup, then constant) allows it"
        )
    loss = config["loss"]
    if loss["supervision"] != "contra" and loss["gan_weight"] > 0 and loss["gan_start"] > 0:
        return f"the GAN term starts at loss.gan_start={loss['gan_start']} of each budget"
    return None


def config_hash(config: dict[str, Any]) -> str:
    """Stable short hash of a resolved config (ignores where results go, not what is computed)."""
    relevant = {k: v for k, v in config.items() if k not in ("tracking", "output_dir", "checkpoint_every")}
    if not (relevant.get("ema") or {}).get("decay"):
        relevant.pop("ema", None)  # EMA off: its other keys change nothing, and the hash is the one from before EMA
    data = relevant.get("data")
    if isinstance(data, dict) and data.get("augment", AUGMENT_OFF) in (None, AUGMENT_OFF):
        relevant["data"] = {k: v for k, v in data.items() if k != "augment"}  # off: the hash from before data.augment
    blob = json.dumps(relevant, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"model.quantizer.name": "mcq", ...} for MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, full))
        else:
            flat[full] = value
    return flat


def as_omegaconf(config: dict[str, Any]) -> DictConfig:
    return OmegaConf.create(config)
