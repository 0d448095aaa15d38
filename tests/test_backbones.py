"""ViT encoder/decoder backbones: geometries, conv stem, unpatchify, presets, config errors, checkpointing.
Shapes, gradients and input checks of every registered encoder and decoder: test_contracts.py."""

from __future__ import annotations

import pytest
import torch
from component_checks import count_checkpoint_calls
from torch import nn

import tokzoo.backbones.vit as vit_module
from tokzoo.backbones import (
    DECODERS,
    ENCODERS,
    ViTDecoder,
    ViTEncoder,
    build_decoder,
    build_encoder,
    list_decoders,
    list_encoders,
)
from tokzoo.errors import ConfigError

TINY = dict(image_size=32, patch_size=4, width=64, depth=2, heads=4, mlp_ratio=2.0)


def test_registries_list_the_presets():
    for names in (list_encoders(), list_decoders()):
        assert {"vit", "vit_tiny", "vit_large_unitok"} <= set(names)
    assert list_encoders() == ENCODERS.names() and list_decoders() == DECODERS.names()


@pytest.mark.parametrize(
    "name, kwargs, tokens, width",
    [
        ("vit", dict(TINY, conv_stem=False, grad_checkpointing=False), 64, 64),
        ("vit", dict(TINY, conv_stem=True), 64, 64),
        ("vit_tiny", {}, 64, 128),
        ("vit_tiny", dict(conv_stem=True), 64, 128),
        # odd factor in the patch size: the conv stem uses a stride-2 stage then a stride-3 stage
        ("vit", dict(TINY, image_size=24, patch_size=6, conv_stem=True), 16, 64),
    ],
)
def test_encoder_and_decoder_shapes(name, kwargs, tokens, width):
    torch.manual_seed(0)
    enc = build_encoder(name, **kwargs)
    size = enc.image_size
    images = torch.randn(2, 3, size, size)
    z = enc(images)
    assert z.shape == (2, tokens, width)
    assert enc.num_tokens == tokens and enc.width == width
    dec_kwargs = {k: v for k, v in kwargs.items() if k != "conv_stem"}
    dec = build_decoder(name, **dec_kwargs)
    out = dec(z)
    assert out.shape == (2, 3, size, size)
    assert torch.isfinite(out).all()


def test_conv_stem_replaces_patch_embedding():
    plain = build_encoder("vit", **TINY)
    stem = build_encoder("vit", **TINY, conv_stem=True)
    assert isinstance(stem.patch_embed, vit_module.ConvStem)
    assert not isinstance(plain.patch_embed, vit_module.ConvStem)
    convs = [m for m in stem.patch_embed.modules() if isinstance(m, nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2, 2, 1]  # patch 4 = two stride-2 stages, then the 1x1 projection


def test_encoder_output_is_layer_normed():
    enc = build_encoder("vit", **TINY)
    z = enc(torch.randn(3, 3, 32, 32))
    # a fresh LayerNorm (unit weight, zero bias) gives each token zero mean and unit variance
    assert torch.allclose(z.mean(-1), torch.zeros(3, 64), atol=1e-5)
    assert torch.allclose(z.var(-1, unbiased=False), torch.ones(3, 64), atol=1e-3)


def test_unpatchify_puts_each_token_in_its_own_patch():
    dec = build_decoder("vit", **TINY)
    images = dec(torch.randn(1, 64, 64))
    tokens = torch.randn(1, 64, 64)
    tokens_changed = tokens.clone()
    tokens_changed[0, 9] += 5.0  # grid 8x8: token 9 is row 1, col 1
    dec.blocks = nn.ModuleList()  # without attention each output patch depends on its own token only
    diff = (dec(tokens_changed) - dec(tokens)).abs().sum(1)[0]  # (H, W)
    assert images.shape == (1, 3, 32, 32)
    changed = diff > 0
    assert changed[4:8, 4:8].all()
    changed[4:8, 4:8] = False
    assert not changed.any()


def test_last_layer_weight_is_the_pixel_projection():
    dec = build_decoder("vit_tiny", width=64, depth=1)
    w = dec.last_layer_weight
    assert isinstance(w, nn.Parameter)
    assert w.shape == (4 * 4 * 3, 64)
    assert w is dec.head.weight
    dec(torch.randn(1, 64, 64)).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


@pytest.mark.parametrize("build", [build_encoder, build_decoder])
@pytest.mark.parametrize(
    "bad, names",
    [
        (dict(image_size=30, patch_size=4), ("image_size=30", "patch_size=4")),
        (dict(width=66, heads=4), ("width=66", "heads=4")),
        (dict(depth=0), ("depth",)),
        (dict(patch_size=0), ("patch_size",)),
        (dict(mlp_ratio=-1.0), ("mlp_ratio",)),
    ],
)
def test_inconsistent_dims_raise_config_error(build, bad, names):
    with pytest.raises(ConfigError) as err:
        build("vit", **{**TINY, **bad})
    for name in names:
        assert name in str(err.value)


def test_unknown_missing_and_misnamed_arguments_raise_config_error():
    with pytest.raises(ConfigError, match="widht"):
        build_encoder("vit_tiny", widht=64)
    with pytest.raises(ConfigError, match="conv_stem"):
        build_decoder("vit_tiny", conv_stem=True)  # the decoder has no stem
    with pytest.raises(ConfigError, match="depth"):
        build_encoder("vit", image_size=32, patch_size=4, width=64, heads=4)
    with pytest.raises(ConfigError, match="vit_tiny"):
        build_encoder("vit_huge_nonexistent")


def test_presets_give_defaults_and_accept_overrides():
    enc = build_encoder("vit_tiny")
    assert isinstance(enc, ViTEncoder)
    assert (enc.image_size, enc.patch_size, enc.width, len(enc.blocks)) == (32, 4, 128, 2)
    assert enc.blocks[0].attn.num_heads == 4
    assert len(build_encoder("vit_tiny", depth=1).blocks) == 1
    dec = build_decoder("vit_tiny", depth=1, width=64)
    assert isinstance(dec, ViTDecoder)
    assert len(dec.blocks) == 1 and dec.width == 64


def test_vit_large_unitok_on_meta_device():
    with torch.device("meta"):
        enc = build_encoder("vit_large_unitok")
        dec = build_decoder("vit_large_unitok")
    assert isinstance(enc.patch_embed, vit_module.ConvStem)
    assert (enc.num_tokens, enc.width, len(enc.blocks)) == (256, 1024, 24)
    assert (dec.num_tokens, dec.width, len(dec.blocks)) == (256, 1024, 24)
    block = 12 * 1024 * 1024 + 13 * 1024  # qkv + proj + 2-layer MLP (ratio 4) weights, biases and norms
    n_enc = sum(p.numel() for p in enc.parameters())
    n_dec = sum(p.numel() for p in dec.parameters())
    assert 24 * block < n_enc < 24 * block + 10_000_000  # the conv stem is a few million
    assert n_dec == 24 * block + 256 * 1024 + 2 * 1024 + 1024 * 768 + 768
    z = enc(torch.empty(2, 3, 256, 256, device="meta"))
    assert z.shape == (2, 256, 1024)
    assert dec(z).shape == (2, 3, 256, 256)
    # overriding a preset key keeps the rest
    with torch.device("meta"):
        small = build_encoder("vit_large_unitok", depth=2, conv_stem=False)
    assert len(small.blocks) == 2 and small.width == 1024
    assert not isinstance(small.patch_embed, vit_module.ConvStem)


@pytest.mark.parametrize("build", [build_encoder, build_decoder])
def test_grad_checkpointing_matches_plain_and_only_runs_in_training(build, monkeypatch):
    calls = count_checkpoint_calls(monkeypatch)
    torch.manual_seed(0)
    plain = build("vit", **TINY)
    ckpt = build("vit", **TINY, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32) if isinstance(plain, ViTEncoder) else torch.randn(2, 64, 64)
    out_plain, out_ckpt = plain(x), ckpt(x)
    assert calls[0] == 2  # one per block
    assert torch.allclose(out_plain, out_ckpt, atol=1e-6)
    out_plain.square().mean().backward()
    out_ckpt.square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
    ckpt.eval()
    ckpt(x)
    with torch.no_grad():
        ckpt.train()(x)
    assert calls[0] == 2  # neither eval mode nor no_grad checkpoints
