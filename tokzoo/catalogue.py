"""The metric catalogue: every metric tokzoo logs, in one table.

For each metric: its MLflow name, a table header, an axis label with its unit, the scale plots apply, which way is
better, whether it is a headline (fit summary, compare table, plot grid), and the rule that says which configs
cannot produce it and why. The fit summary, the MLflow `absent.<metric>` tags, `tokzoo compare`, the plots and the
sweep objectives all read this table; a new metric is one entry here plus the code that computes it.

This module imports nothing heavy (no torch): the sweep process and `tokzoo compare` read it cheaply.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tokzoo.errors import ConfigError

Rule = Callable[[dict[str, Any]], "str | None"]  # resolved run config -> why the metric is absent, or None


@dataclass(frozen=True)
class Metric:
    name: str  # MLflow key, e.g. val/psnr; a pattern entry ends in /<k> (val/codebook_usage/<k>)
    header: str  # short column header (tables)
    label: str  # axis label with unit or scale (plots)
    higher_is_better: bool | None  # None: neither (a diagnostic, e.g. the logit scale)
    scale: float = 1.0  # plots multiply by this (fractions -> %)
    headline: bool = False  # shown by the fit summary, the compare table and the plot grid
    absent_when: tuple[Rule, ...] = ()
    reduce: str = "last"  # per run: the "last" logged value, or the "mean" over every logged step

    @property
    def direction(self) -> str | None:
        return None if self.higher_is_better is None else ("maximize" if self.higher_is_better else "minimize")


# ---- absence rules: config -> reason (None when the config can produce the metric) ----------------------------
def _no_decoder(config: dict[str, Any]) -> str | None:
    return "supervision=contra trains no decoder" if config["loss"]["supervision"] == "contra" else None


def _no_text(config: dict[str, Any]) -> str | None:
    return "supervision=recon trains no text tower" if config["loss"]["supervision"] == "recon" else None


def _eval_off(flag: str) -> Rule:
    def rule(config: dict[str, Any]) -> str | None:
        return None if config["eval"][flag] else f"eval.{flag}=false"

    return rule


def _weights(name: str) -> Rule:
    def rule(config: dict[str, Any]) -> str | None:
        from tokzoo.weights import weights_available

        ok, reason = weights_available(name)
        return None if ok else reason

    return rule


def _continuous(config: dict[str, Any]) -> str | None:
    from tokzoo.quantizers import QUANTIZERS

    name = config["model"]["quantizer"]["name"]
    return f"quantizer '{name}' is continuous" if getattr(QUANTIZERS.get(name), "continuous", False) else None


def _no_stability_images(config: dict[str, Any]) -> str | None:
    return None if config["eval"]["stability_images"] > 0 else "eval.stability_images=0"


def _no_gan(config: dict[str, Any]) -> str | None:
    if config["loss"]["supervision"] == "contra" or not config["loss"]["gan_weight"] > 0:
        return "no GAN term (loss.gan_weight=0 or supervision=contra)"
    return None


def _not_both(config: dict[str, Any]) -> str | None:
    if config["loss"]["supervision"] != "both":
        return f"supervision={config['loss']['supervision']} has one loss: no gradient conflict to measure"
    if not config["loss"]["grad_cos_every"]:
        return "loss.grad_cos_every=0"
    frozen = (config["optim"].get("lr_mult") or {}).get("encoder") == 0
    return "the encoder is frozen (optim.lr_mult.encoder=0): no shared gradients to compare" if frozen else None


def _no_raw_pass(config: dict[str, Any]) -> str | None:
    ema = config.get("ema") or {}
    if not ema.get("decay"):
        return "ema.decay=0: no EMA, so val/* are the raw weights' metrics"
    return None if ema.get("raw_metrics", True) else "ema.raw_metrics=false"


def _probe_off(config: dict[str, Any]) -> str | None:
    return None if config["eval"]["generation"]["steps"] > 0 else "eval.generation.steps=0 (the probe is off)"


FIDELITY_RULES = (_no_decoder,)
CODEBOOK_RULES = (_continuous,)

_ENTRIES = (
    Metric("val/psnr", "PSNR (dB)", "PSNR (dB)", True, headline=True, absent_when=FIDELITY_RULES),
    Metric("val/ssim", "SSIM", "SSIM (0-1)", True, headline=True, absent_when=FIDELITY_RULES),
    Metric(
        "val/lpips", "LPIPS", "LPIPS (lower is better)", False, headline=True,
        absent_when=(*FIDELITY_RULES, _eval_off("lpips"), _weights("lpips_vgg")),
    ),
    Metric(
        "val/rfid", "rFID", "rFID (lower is better)", False, headline=True,
        absent_when=(*FIDELITY_RULES, _eval_off("rfid"), _weights("inception_fid")),
    ),
    Metric(
        "val/zeroshot_acc", "zero-shot acc", "zero-shot accuracy (%)", True, 100.0, headline=True,
        absent_when=(_no_text, _eval_off("zero_shot")),
    ),
    Metric(
        "val/retrieval_r1", "retrieval R@1", "image-text retrieval R@1 (%)", True, 100.0, headline=True,
        absent_when=(_no_text, _eval_off("retrieval")),
    ),
    Metric(
        "val/linprobe_acc", "lin. probe acc", "linear-probe accuracy (%)", True, 100.0, headline=True,
        absent_when=(_eval_off("linear_probe"),),
    ),
    # Per attribute task the captions name (the embedded dataset: color, size, position, background) and their
    # mean with the class task ("mean"); the class task itself stays the headline above.
    Metric(
        "val/zeroshot_acc/<attr>", "zero-shot acc (attribute)", "zero-shot accuracy on an attribute (%)", True, 100.0,
        absent_when=(_no_text, _eval_off("zero_shot")),
    ),
    Metric(
        "val/linprobe_acc/<attr>", "lin. probe acc (attribute)", "linear-probe accuracy on an attribute (%)", True,
        100.0, absent_when=(_eval_off("linear_probe"),),
    ),
    Metric(
        "val/codebook_usage", "codebook usage", "codebook usage (% of entries)", True, 100.0, headline=True,
        absent_when=CODEBOOK_RULES,
    ),
    Metric("val/perplexity", "perplexity", "code perplexity (codes)", True, headline=True, absent_when=CODEBOOK_RULES),
    Metric("val/dead_codes", "dead codes", "dead codes (% of entries)", False, 100.0, absent_when=CODEBOOK_RULES),
    Metric(
        "val/codebook_usage/<k>", "usage (codebook k)", "usage of sub-codebook k (%)", True, 100.0,
        absent_when=CODEBOOK_RULES,
    ),
    Metric(
        "val/perplexity/<k>", "perplexity (codebook k)", "code perplexity of sub-codebook k", True,
        absent_when=CODEBOOK_RULES,
    ),
    Metric(
        "val/code_mi_bits", "code MI (bits)", "mutual information between a token's codes (bits)", False,
        absent_when=(*CODEBOOK_RULES, _eval_off("token_diagnostics")),
    ),
    Metric(
        "val/code_class_nmi", "code-class NMI", "NMI of codes and image class", True,
        absent_when=(*CODEBOOK_RULES, _eval_off("token_diagnostics")),
    ),
    Metric(
        "val/code_stability", "code stability", "codes unchanged under 40 dB noise (%)", True, 100.0,
        absent_when=(*CODEBOOK_RULES, _eval_off("token_diagnostics"), _no_stability_images),
    ),
    Metric("val/bits_per_token", "bits/token", "bits per token", None, absent_when=CODEBOOK_RULES),
    Metric("train/loss", "loss", "training loss", False),
    Metric("train/loss_quant", "quant. loss", "quantizer loss", False),
    Metric("train/loss_recon", "recon. loss", "reconstruction loss", False, absent_when=FIDELITY_RULES),
    Metric("train/loss_pixel", "pixel loss", "pixel loss (L1/L2)", False, absent_when=FIDELITY_RULES),
    Metric(
        "train/loss_lpips", "LPIPS loss", "perceptual loss", False,
        absent_when=(*FIDELITY_RULES, _eval_off("lpips"), _weights("lpips_vgg")),
    ),
    Metric("train/loss_gan", "GAN loss", "generator hinge loss", False, absent_when=(_no_gan,)),
    Metric("train/loss_disc", "disc. loss", "discriminator hinge loss", False, absent_when=(_no_gan,)),
    Metric("train/loss_contra", "contra. loss", "contrastive loss", False, absent_when=(_no_text,)),
    Metric("train/logit_scale", "logit scale", "contrastive logit scale", None, absent_when=(_no_text,)),
    # Global-batch columns with a row's caption, its own included (the positives under contra_duplicates=positive);
    # a property of the data, so a run's value is its mean over training.
    Metric(
        "train/contra_positives_per_row", "positives/row", "identical captions per row (global batch)", None,
        absent_when=(_no_text,), reduce="mean",
    ),
    # The cosine is logged every k steps; one run's value is its mean over training (the last one is noise).
    Metric(
        "train/grad_cos_recon_contra", "grad cos (mean)", "grad cosine recon vs contra (mean over steps)", True,
        absent_when=(_not_both,), reduce="mean",
    ),
    Metric("train/grad_norm_recon", "grad norm recon", "grad L2 norm, recon", None, absent_when=(_not_both,)),
    Metric("train/grad_norm_contra", "grad norm contra", "grad L2 norm, contra", None, absent_when=(_not_both,)),
    Metric("train/skipped_samples", "skipped", "unreadable samples replaced (running total over ranks)", False),
    Metric("val/num_images", "val images", "validation images scored (over all ranks)", None),
    Metric("perf/images_per_sec", "images/s", "training throughput (images/s)", True),
    Metric("perf/wall_seconds", "time (s)", "wall time (s)", False),
)  # fmt: skip
# The generation probe (eval.generation, tokzoo/generation/): after training, an autoregressive prior over the frozen
# tokenizer's codes; bits on held-out validation codes, and its class-conditional samples judged by a reference
# classifier trained on the dataset's real images. Run once on the final weights, so no raw-weights twin.
_GENERATION = (
    Metric(
        "val/gen_bits_per_image", "gen bits/img", "prior NLL of an image's codes (bits, held out)", False,
        headline=True, absent_when=(*CODEBOOK_RULES, _probe_off),
    ),
    Metric(
        "val/gen_bits_per_token", "gen bits/token", "prior NLL per token position (bits, held out)", False,
        absent_when=(*CODEBOOK_RULES, _probe_off),
    ),
    Metric(
        "val/gen_uniform_bits_per_image", "uniform bits/img", "uniform bound: bits of an image's codes", None,
        absent_when=(*CODEBOOK_RULES, _probe_off),
    ),
    Metric(
        "val/gen_class_acc", "gen class acc", "reference accuracy on class-conditional samples (%)", True, 100.0,
        headline=True, absent_when=(*CODEBOOK_RULES, _probe_off, _no_decoder),
    ),
    Metric(
        "val/gen_ref_acc", "ref. classifier acc", "reference classifier accuracy on real val images (%)", True, 100.0,
        absent_when=(*CODEBOOK_RULES, _probe_off, _no_decoder),
    ),
    Metric(
        "val/gen_fd_ref", "gen FD (ref.)", "Frechet distance of samples, reference-classifier features", False,
        headline=True, absent_when=(*CODEBOOK_RULES, _probe_off, _no_decoder),
    ),
    Metric(
        "val/gfid", "gFID", "gFID (Inception, lower is better)", False,
        absent_when=(*CODEBOOK_RULES, _probe_off, _no_decoder, _weights("inception_fid")),
    ),
    Metric("perf/gen_seconds", "probe (s)", "generation probe wall time (s)", False, absent_when=(_probe_off,)),
)  # fmt: skip
RAW_PREFIX = "val_raw/"


def raw_name(name: str) -> str:
    """The raw weights' counterpart of a validation metric of an EMA run: val/psnr -> val_raw/psnr."""
    return RAW_PREFIX + name.removeprefix("val/")


# A run with an EMA (ema.decay > 0) validates the EMA weights (val/*); with ema.raw_metrics it also logs the headline
# metrics of the raw weights under val_raw/. Not headline themselves: the plot grid stays the EMA's.
_ENTRIES += tuple(
    Metric(
        raw_name(m.name), f"raw {m.header}", f"{m.label}, raw weights (EMA run)", m.higher_is_better, m.scale,
        absent_when=(_no_raw_pass, *m.absent_when),
    )
    for m in _ENTRIES
    if m.headline
)  # fmt: skip

RAW_HEADLINE = tuple(m.name for m in _ENTRIES if m.name.startswith(RAW_PREFIX))
_ENTRIES += _GENERATION

CATALOGUE: dict[str, Metric] = {m.name: m for m in _ENTRIES}
_SLOTS = {"<k>": r"\d+", "<attr>": r"[a-z][a-z_]*"}  # what a pattern entry's last segment matches


def is_pattern(name: str) -> bool:
    return any(slot in name for slot in _SLOTS)


def _compile(name: str) -> re.Pattern:
    text = re.escape(name)
    for slot, regex in _SLOTS.items():
        text = text.replace(re.escape(slot), regex)
    return re.compile("^" + text + "$")


_PATTERNS = [(_compile(m.name), m) for m in _ENTRIES if is_pattern(m.name)]
# Headline validation metrics, in the order tables and plots show them.
HEADLINE = tuple(m.name for m in _ENTRIES if m.headline)
# The columns of `tokzoo compare`: the headline, the raw weights' headline (EMA runs only), then diagnostics.
ATTRIBUTE_COLUMNS = ("color", "size", "position", "background", "mean")  # the embedded dataset's, where logged
ATTRIBUTE_MEANS = ("val/zeroshot_acc/mean", "val/linprobe_acc/mean")
TABLE = (
    *HEADLINE, *RAW_HEADLINE,
    *(f"val/{m}_acc/{a}" for m in ("zeroshot", "linprobe") for a in ATTRIBUTE_COLUMNS),
    "val/dead_codes", "val/code_mi_bits", "val/code_class_nmi", "val/code_stability",
    "val/gen_bits_per_token", "val/gen_ref_acc", "val/gfid", "train/grad_cos_recon_contra", "perf/images_per_sec",
    "perf/wall_seconds", "perf/gen_seconds",
)  # fmt: skip


def lookup(name: str) -> Metric | None:
    """The catalogue entry for a metric name (pattern entries match val/codebook_usage/3 etc.); None if unknown."""
    if name in CATALOGUE:
        return CATALOGUE[name]
    return next((m for pattern, m in _PATTERNS if pattern.match(name)), None)


def metric(name: str, where: str = "metric") -> Metric:
    """The entry, or a ConfigError naming the known metrics."""
    found = lookup(name)
    if found is None:
        raise ConfigError(f"{where}: unknown metric '{name}'; known metrics: {', '.join(CATALOGUE)}")
    return found


def absence(name: str, config: dict[str, Any]) -> str | None:
    """Why this config will not produce the metric (known before training), or None when it will."""
    entry = lookup(name)
    for rule in entry.absent_when if entry else ():
        reason = rule(config)
        if reason:
            return reason
    return None


def absent_metrics(config: dict[str, Any], prefix: str = "val/") -> dict[str, str]:
    """metric -> reason for every catalogue metric under prefix that this config cannot produce."""
    out = {}
    for name in CATALOGUE:
        if is_pattern(name) or not name.startswith(prefix):
            continue
        reason = absence(name, config)
        if reason:
            out[name] = reason
    return out


def label(name: str) -> str:
    entry = lookup(name)
    return entry.label if entry else name


def header(name: str) -> str:
    """The entry's header; for a pattern entry with the name's own last part ("usage (codebook 2)", "zero-shot
    acc (color)")."""
    entry = lookup(name)
    if entry is None:
        return name
    if not is_pattern(entry.name):
        return entry.header
    part = name.rsplit("/", 1)[1]
    return entry.header.replace("(codebook k)", f"(codebook {part})").replace("(attribute)", f"({part})")
