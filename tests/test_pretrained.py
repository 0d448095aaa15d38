"""Pretrained towers from timm and open_clip, offline: the tests build small models, save their weights to files
(safetensors, torch, wrapped training checkpoints) and check that tokzoo loads them exactly, reports what it skipped,
refuses what does not fit, freezes what lr_mult 0 names, and stops with exit 2 naming the weights when offline."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import timm
import torch
from conftest import TINY_BASE, run_tokzoo, write_yaml
from safetensors.torch import save_file

from tokzoo.backbones import OpenClipEncoder, TimmEncoder, write_tiny_open_clip_config
from tokzoo.backbones.checkpoints import read_state_dict
from tokzoo.errors import ConfigError
from tokzoo.lit.module import TokenizerModule
from tokzoo.text import OpenClipText

TIMM_NAME = "vit_base_patch16_clip_224"  # the CLIP ViT layout (pre-norm, quick layout of OpenAI's), made tiny
TIMM_SMALL = dict(embed_dim=32, depth=1, num_heads=2, patch_size=8)
ROOT = Path(__file__).resolve().parent.parent


def timm_net(image_size: int = 32, **overrides) -> torch.nn.Module:
    torch.manual_seed(1)
    net = timm.create_model(
        TIMM_NAME, pretrained=False, num_classes=0, img_size=image_size, **{**TIMM_SMALL, **overrides}
    )
    with torch.no_grad():  # far from any init, so that "loaded" and "initialised" cannot be confused
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return net.eval()


def normalised(images: torch.Tensor, mean, std) -> torch.Tensor:
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean) / std


def tiny_clip(folder: Path, image_size: int = 32, patch_size: int = 8) -> tuple[torch.nn.Module, Path]:
    config = write_tiny_open_clip_config(folder, image_size=image_size, patch_size=patch_size)
    open_clip.add_model_config(config)
    torch.manual_seed(2)
    clip = open_clip.create_model("tiny_clip")
    with torch.no_grad():
        for p in clip.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return clip.eval(), config


# ---- timm ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_timm_encoder_loads_a_state_dict_exactly(tmp_path: Path, suffix: str) -> None:
    net = timm_net()
    path = tmp_path / f"vit{suffix}"
    save_file(net.state_dict(), path) if suffix == ".safetensors" else torch.save(net.state_dict(), path)
    enc = TimmEncoder(image_size=32, model=TIMM_NAME, pretrained=str(path), model_kwargs=TIMM_SMALL).eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    expected = net.forward_features(normalised(images, net.pretrained_cfg["mean"], net.pretrained_cfg["std"]))[:, 1:]
    assert torch.equal(enc(images), expected)
    assert enc.width == 32 and enc.grid_size == 4 and enc.num_tokens == 16 and enc.patch_size == 8
    assert enc.load_report.missing == [] and enc.load_report.loaded == len(net.state_dict())


def test_timm_encoder_resamples_position_embeddings_to_the_image_size(tmp_path: Path) -> None:
    net = timm_net(image_size=32)
    save_file(net.state_dict(), tmp_path / "vit.safetensors")
    enc = TimmEncoder(
        image_size=64, model=TIMM_NAME, pretrained=str(tmp_path / "vit.safetensors"), model_kwargs=TIMM_SMALL
    )
    assert enc.net.pos_embed.shape == (1, 1 + 64, 32) and enc.num_tokens == 64
    assert torch.equal(enc.net.blocks[0].attn.qkv.weight, net.blocks[0].attn.qkv.weight)
    assert torch.equal(enc.net.cls_token, net.cls_token)  # the class token's position is kept, patches resampled
    assert enc(torch.zeros(1, 3, 64, 64)).shape == (1, 64, 32)


def test_shape_mismatch_names_the_keys_and_both_shapes(tmp_path: Path) -> None:
    save_file(timm_net(embed_dim=48, num_heads=2).state_dict(), tmp_path / "wide.safetensors")
    with pytest.raises(ConfigError, match=r"do not fit the model .*\(1, 1, 48\) vs model \(1, 1, 32\)") as err:
        TimmEncoder(
            image_size=32, model=TIMM_NAME, pretrained=str(tmp_path / "wide.safetensors"), model_kwargs=TIMM_SMALL
        )
    assert "cls_token" in str(err.value)


def test_missing_and_unexpected_keys_are_reported(tmp_path: Path) -> None:
    state = dict(timm_net().state_dict())
    dropped = state.pop("norm.weight")
    state["extra.head.weight"] = torch.zeros(3)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}  # a DDP training checkpoint
    torch.save(wrapped, tmp_path / "ckpt.pth")
    enc = TimmEncoder(image_size=32, model=TIMM_NAME, pretrained=str(tmp_path / "ckpt.pth"), model_kwargs=TIMM_SMALL)
    report = enc.load_report
    assert report.missing == ["norm.weight"] and report.unexpected == ["extra.head.weight"]
    assert "1 missing" in report.summary() and "1 unexpected" in report.summary()
    assert not torch.equal(enc.net.norm.weight, dropped)  # left at its init
    assert torch.equal(enc.net.blocks[0].mlp.fc1.weight, state["blocks.0.mlp.fc1.weight"])


def test_bad_weight_files_are_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist; fix model.encoder.pretrained"):
        TimmEncoder(image_size=32, model=TIMM_NAME, pretrained=str(tmp_path / "nope.pt"), model_kwargs=TIMM_SMALL)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read weights file"):
        TimmEncoder(image_size=32, model=TIMM_NAME, pretrained=str(tmp_path / "junk.pt"), model_kwargs=TIMM_SMALL)
    save_file({"foo.bar": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ConfigError, match="none of the 1 tensors"):
        TimmEncoder(
            image_size=32, model=TIMM_NAME, pretrained=str(tmp_path / "other.safetensors"), model_kwargs=TIMM_SMALL
        )
    with pytest.raises(ConfigError, match="timm has no model 'not_a_model'"):
        TimmEncoder(image_size=32, model="not_a_model")


# ---- open_clip -------------------------------------------------------------------------------------------------
def test_open_clip_towers_load_one_full_checkpoint_exactly(tmp_path: Path) -> None:
    clip, config = tiny_clip(tmp_path)
    path = tmp_path / "open_clip_model.safetensors"
    save_file(clip.state_dict(), path)
    enc = OpenClipEncoder(image_size=32, model=str(config), pretrained=str(path)).eval()
    text = OpenClipText(model=str(config), pretrained=str(path)).eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    x = normalised(images, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    expected = clip.visual.forward_intermediates(
        x, indices=1, normalize_intermediates=True, intermediates_only=True, output_fmt="NLC"
    )["image_intermediates"][-1]
    assert torch.equal(enc(images), expected)
    ids = text.tokenizer(["a photo of a cat", "a dog"])
    assert torch.equal(ids, open_clip.get_tokenizer("tiny_clip")(["a photo of a cat", "a dog"]))
    assert torch.equal(text(ids), clip.encode_text(ids))
    assert text.pretrained_logit_scale == pytest.approx(float(clip.logit_scale.detach().exp()))
    # each tower took its own share of the file, all of it: nothing missing, nothing left over
    assert enc.load_report.missing == enc.load_report.unexpected == []
    assert text.load_report.missing == text.load_report.unexpected == []
    assert enc.load_report.loaded + text.load_report.loaded == len(clip.state_dict())


def test_open_clip_offline_tag_exits_2_naming_the_weights(tmp_path: Path) -> None:
    config = write_yaml(
        tmp_path / "clip.yaml",
        {
            **TINY_BASE,
            "output_dir": str(tmp_path / "out"),
            "model": {"encoder": {"name": "open_clip", "model": "ViT-B-16", "pretrained": "openai"}},
        },
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = run_tokzoo(["fit", str(config)], tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr
    message = " ".join(proc.stderr.split())
    assert "open_clip_model.safetensors" in message and "timm/vit_base_patch16_clip_224.openai" in message
    assert "model.encoder.pretrained=/path/to/file" in message
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.ckpt"))


def test_timm_pretrained_true_offline_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ConfigError, match="timm/vit_base_patch16_clip_224.openai.*set model.encoder.pretrained"):
        TimmEncoder(image_size=32, model="vit_base_patch16_clip_224.openai", pretrained=True, model_kwargs=TIMM_SMALL)


# ---- lr_mult and lock ----------------------------------------------------------------------------------------
def tiny_config(tmp_path: Path, **sections) -> dict:
    from tokzoo.config import defaults, merge, resolve

    return resolve(merge(merge(defaults(), {**TINY_BASE, "output_dir": str(tmp_path / "out")}), sections))


def test_lr_mult_groups_and_freezing(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, optim={"lr_mult": {"encoder": 0.0, "decoder": 0.5}}, model={"text": {"lock": True}})
    module = TokenizerModule(config)
    assert module.frozen_parts == ["encoder", "text"]
    assert not any(p.requires_grad for p in module.model.encoder.parameters())
    assert not any(p.requires_grad for p in module.model.text_tower.parameters())
    optimizer = module.optimizer_and_schedule(10)["optimizer"]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in module.model.encoder.parameters()}
    decoder_lrs = {
        g["initial_lr"]
        for g in optimizer.param_groups
        for p in g["params"]
        if any(p is q for q in module.model.decoder.parameters())
    }
    assert decoder_lrs == {0.5 * config["optim"]["lr"]}
    with pytest.raises(ConfigError, match="lr_mult"):
        tiny_config(tmp_path, optim={"lr_mult": {"vision": 0.0}})
    with pytest.raises(ConfigError, match="lr_mult.encoder"):
        tiny_config(tmp_path, optim={"lr_mult": {"encoder": -1.0}})


@pytest.mark.slow
def test_frozen_pretrained_encoder_and_locked_text_stay_bit_identical_through_fit(tmp_path: Path) -> None:
    """The ablation file itself, on a tiny checkpoint: every variant trains; the frozen parts in the final checkpoint
    equal the file's tensors bit for bit, the trained ones moved."""
    clip, config = tiny_clip(tmp_path, image_size=64, patch_size=16)
    weights = tmp_path / "tiny_clip.pt"
    torch.save({"state_dict": clip.state_dict()}, weights)
    env = {"TOKZOO_CLIP_MODEL": str(config), "TOKZOO_CLIP_WEIGHTS": str(weights)}
    args = ["fit", str(ROOT / "ablations" / "clip_init.yaml"), f"output_dir={tmp_path / 'out'}", "trainer.max_steps=3"]
    args += ["data.batch_size=8", "data.kwargs.num_train=32", "data.kwargs.num_val=16", "trainer.log_every_n_steps=1"]
    proc = run_tokzoo(args, tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    file_state = read_state_dict(weights)

    def final(variant: str) -> dict[str, torch.Tensor]:
        (ckpt,) = (tmp_path / "out" / "clip_init" / variant / "checkpoints").glob("last-*.ckpt")
        return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]

    def same(state: dict, prefix: str, file_prefix: str, exclude: tuple[str, ...] = ()) -> bool:
        keys = [k for k in state if k.startswith(prefix) and not k[len(prefix) :].startswith(exclude)]
        assert keys
        return all(torch.equal(state[k], file_state[file_prefix + k[len(prefix) :]]) for k in keys)

    frozen = final("frozen_vision")
    assert same(frozen, "model.encoder.visual.", "visual.")
    assert same(frozen, "model.text_tower.clip.", "")
    locked = final("clip_locked_text")
    assert same(locked, "model.text_tower.clip.", "") and not same(locked, "model.encoder.visual.", "visual.")
    trained = final("clip_init")
    assert not same(trained, "model.text_tower.clip.", "")
    scratch = final("scratch")
    assert not same(scratch, "model.encoder.visual.", "visual.", exclude=("ln_", "class_embedding"))
