"""loss.recon_batch_fraction (UniTok's vae_local_bs): in training the decoder and the reconstruction losses see the
first ceil(f * B) images, the quantizer and contrastive losses the whole batch; validation decodes everything."""

from __future__ import annotations

import pytest
import torch

from tokzoo.config import defaults, merge, resolve
from tokzoo.errors import ConfigError


def module_with(fraction: float):
    from tokzoo.lit.module import TokenizerModule

    over = {
        "loss": {"supervision": "both", "recon_batch_fraction": fraction},
        "eval": {"lpips": False, "rfid": False},
        "model": {"encoder": {"name": "vit_tiny", "depth": 1}, "decoder": {"name": "vit_tiny", "depth": 1}},
    }
    torch.manual_seed(0)
    return TokenizerModule(resolve(merge(defaults(), over)))


def batch(n: int = 8) -> dict:
    torch.manual_seed(1)
    return {"image": torch.rand(n, 3, 32, 32) * 2 - 1, "caption": [f"a shape number {i}" for i in range(n)]}


def test_the_decoder_sees_the_fraction_and_the_contrastive_loss_the_whole_batch():
    full, quarter = module_with(1.0), module_with(0.25)
    quarter.load_state_dict(full.state_dict())
    b = batch(8)
    out_full, terms_full = full.loss_terms(b, 0)
    out_q, terms_q = quarter.loss_terms(b, 0)
    assert out_full.recon.shape[0] == 8 and out_q.recon.shape[0] == 2  # ceil(0.25 * 8)
    assert out_q.image_emb.shape[0] == 8 and out_q.text_emb.shape[0] == 8
    assert torch.allclose(terms_q["loss_contra"], terms_full["loss_contra"])
    assert torch.allclose(terms_q["loss_quant"], terms_full["loss_quant"])
    # the decoder works per image: the sub-batch's reconstructions are the full batch's first rows
    assert torch.allclose(out_q.recon, out_full.recon[:2], atol=1e-5)
    expected = quarter.objective.pixel(out_full.recon[:2], b["image"][:2])
    assert torch.allclose(terms_q["loss_pixel"], expected, atol=1e-6)
    assert not torch.allclose(terms_q["loss_pixel"], terms_full["loss_pixel"])


def test_gradients_reach_every_part_with_a_fraction():
    module = module_with(0.25)
    _, terms = module.loss_terms(batch(8), 0)
    terms["loss"].backward()
    for part in ("encoder", "decoder", "text_tower"):
        grads = [p.grad for p in getattr(module.model, part).parameters() if p.requires_grad]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), part


def test_rounding_keeps_at_least_one_image():
    module = module_with(0.1)
    assert module.objective.recon_rows(3) == 1 and module.objective.recon_rows(20) == 2
    assert module_with(1.0).objective.recon_rows(8) is None


@pytest.mark.parametrize("bad", [0, 1.5, -0.25])
def test_out_of_range_fraction_is_a_config_error(bad):
    with pytest.raises(ConfigError, match=r"loss\.recon_batch_fraction.*\(0, 1\]"):
        resolve(merge(defaults(), {"loss": {"recon_batch_fraction": bad}}))
