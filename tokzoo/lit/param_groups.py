"""The optimiser's parameter groups: weight decay or not, and a learning-rate multiplier per part of the tokenizer.

    optim.lr_mult: {encoder: 0.1, text: 0}     # 0 freezes a part: no gradients, no optimiser state
    model.text.lock: true                      # the same as lr_mult.text: 0 (UniTok's lock_text)

Parts are named by the UnifiedTokenizer's attributes: encoder, decoder (with decoder_in), text (tower), quantizer,
factorization (down and up) and head (the image head and the logit scale). The discriminator keeps optim.disc_lr.
"""

from __future__ import annotations

from typing import Any

from torch import nn

PART_OF_ATTRIBUTE = {
    "encoder": "encoder",
    "decoder": "decoder",
    "decoder_in": "decoder",
    "text_tower": "text",
    "quantizer": "quantizer",
    "factor_down": "factorization",
    "factor_up": "factorization",
    "image_head": "head",
    "logit_scale": "head",
}
PARTS = sorted(set(PART_OF_ATTRIBUTE.values()))


def lr_multipliers(config: dict[str, Any]) -> dict[str, float]:
    """Part -> multiplier of optim.lr (every part present; model.text.lock forces text to 0)."""
    mults = {part: 1.0 for part in PARTS}
    mults.update({k: float(v) for k, v in (config["optim"].get("lr_mult") or {}).items()})
    if (config["model"].get("text") or {}).get("lock"):
        mults["text"] = 0.0
    return mults


def part_of(name: str) -> str:
    """'encoder.blocks.0.attn.qkv.weight' (a name inside UnifiedTokenizer) -> 'encoder'."""
    return PART_OF_ATTRIBUTE.get(name.split(".", 1)[0], "head")


def freeze_parts(model: nn.Module, mults: dict[str, float]) -> list[str]:
    """Turn off gradients of the parts whose multiplier is 0; returns those parts' names."""
    frozen = sorted(part for part, m in mults.items() if m == 0)
    for name, p in model.named_parameters():
        if part_of(name) in frozen:
            p.requires_grad_(False)
    return frozen


def parameter_groups(
    model: nn.Module, optim_cfg: dict[str, Any], mults: dict[str, float], skip: set[int] = frozenset()
) -> list[dict[str, Any]]:
    """AdamW groups over the tokenizer's trainable parameters: one per (part multiplier, decay or not).

    Norms, biases, position embeddings, the logit scale and codebooks carry no weight decay (codebooks do when
    optim.codebook_weight_decay is true). Frozen parameters and those in `skip` are left out."""
    codebooks = {id(p) for p in model.quantizer.codebook_parameters()}
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in skip:
            continue
        is_codebook = id(p) in codebooks
        exempt = p.ndim < 2 or "pos_embed" in name or "positional_embedding" in name
        no_decay = (is_codebook and not optim_cfg["codebook_weight_decay"]) or (not is_codebook and exempt)
        groups.setdefault((mults[part_of(name)], no_decay), []).append(p)
    return [
        {"params": params, "weight_decay": 0.0 if no_decay else optim_cfg["weight_decay"], "lr": optim_cfg["lr"] * m}
        for (m, no_decay), params in sorted(groups.items(), key=lambda kv: (kv[0][1], -kv[0][0]))
    ]
