"""`compile: true` (torch.compile of encoder, decoder and text tower): same numbers, same checkpoints."""

from __future__ import annotations

import shutil

import pytest
import torch

from tokzoo.config import defaults, merge, resolve
from tokzoo.lit.module import TokenizerModule


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor on CPU needs a C compiler"
)
def test_compiled_module_matches_eager_and_keeps_parameter_names():
    config = resolve(merge(defaults(), {"model": {"encoder": {"name": "vit_tiny", "depth": 1}}}))
    torch.manual_seed(0)
    eager = TokenizerModule(config)
    compiled = TokenizerModule({**config, "compile": True})
    # nn.Module.compile works in place: no `_orig_mod.` prefixes, so checkpoints load either way
    assert list(compiled.state_dict()) == list(eager.state_dict())
    compiled.load_state_dict(eager.state_dict())
    assert compiled.model.encoder._compiled_call_impl is not None and eager.model.encoder._compiled_call_impl is None

    images = torch.rand(4, 3, 32, 32) * 2 - 1
    captions = ["a small red star at the top on a plain blue background"] * 4
    for module in (eager, compiled):
        module.train()
    out_e, out_c = eager.model(images), compiled.model(images)
    torch.testing.assert_close(out_c.recon, out_e.recon, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out_c.image_emb, out_e.image_emb, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        compiled.model.encode_text(captions), eager.model.encode_text(captions), rtol=1e-4, atol=1e-4
    )
    # gradients flow through the compiled graphs to the same values
    out_e.recon.square().mean().backward()
    out_c.recon.square().mean().backward()
    for (name, p_e), (_, p_c) in zip(eager.model.encoder.named_parameters(), compiled.model.encoder.named_parameters()):
        assert p_c.grad is not None, name
        torch.testing.assert_close(p_c.grad, p_e.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_compile_must_be_a_boolean():
    from tokzoo.config import validate
    from tokzoo.errors import ConfigError

    with pytest.raises(ConfigError, match="compile"):
        validate(resolve(merge(defaults(), {"compile": "yes"})))
