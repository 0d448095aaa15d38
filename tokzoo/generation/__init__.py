"""The generation leg: a token-prior probe (an autoregressive prior over a frozen tokenizer's codes) and the
reference classifier that judges its samples. See probe.py."""

from tokzoo.generation.prior import TokenPrior
from tokzoo.generation.probe import GENERATION_METRICS, ProbeResult, run_probe

__all__ = ["GENERATION_METRICS", "ProbeResult", "TokenPrior", "run_probe"]
