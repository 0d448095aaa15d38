"""CLIP BPE tokenizer and causal text tower."""

from __future__ import annotations

import pytest
import torch
from component_checks import count_checkpoint_calls

import tokzoo.text.tower as tower_module
from tokzoo.errors import ConfigError, DataError
from tokzoo.text import (
    TEXT_TOWERS,
    TOKENIZERS,
    TextTransformer,
    build_text_tower,
    build_tokenizer,
    list_text_towers,
    list_tokenizers,
)

CTX = 16
LONG = "a very long caption about a small brown dog that runs after a red ball across a green field at dusk"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("clip_bpe", context_length=CTX)


def small_tower(vocab_size: int, **kw) -> TextTransformer:
    args = dict(vocab_size=vocab_size, context_length=CTX, width=32, depth=2, heads=4, embed_dim=24)
    return build_text_tower("transformer", **{**args, **kw})


def test_registries():
    assert list_tokenizers() == TOKENIZERS.names() and "clip_bpe" in list_tokenizers()
    assert {"transformer", "transformer_unitok"} <= set(list_text_towers()) == set(TEXT_TOWERS.names())


def test_tokenizer_shape_special_tokens_and_padding(tok):
    ids = tok(["a photo of a cat", "dog"])
    assert ids.dtype == torch.long and ids.shape == (2, CTX)
    assert tok.vocab_size == 49408
    assert (ids[:, 0] == tok.sot_id).all()
    for row in ids:
        eot = (row == tok.eot_id).nonzero().flatten()
        assert len(eot) == 1
        assert (row[eot + 1 :] == 0).all() and (row[1:eot] != 0).all()
    # EOT has the highest id, so argmax finds it (the text tower pools there)
    assert tok.eot_id == tok.vocab_size - 1
    assert (ids.argmax(-1) == (ids == tok.eot_id).int().argmax(-1)).all()
    assert tok.decode(ids[0]) == "a photo of a cat"


def test_tokenizer_truncation_keeps_eot(tok):
    ids = tok([LONG])
    assert ids.shape == (1, CTX)
    assert ids[0, -1] == tok.eot_id and ids[0, 0] == tok.sot_id
    assert (ids[0, 1:-1] != 0).all()
    assert (ids[0] == tok.eot_id).sum() == 1


def test_tokenizer_is_deterministic_and_distinguishes_strings(tok):
    a = tok(["a photo of a cat", "a photo of a dog", "a photo of a cat"])
    assert torch.equal(a[0], a[2])
    assert not torch.equal(a[0], a[1])
    assert torch.equal(tok("a photo of a cat")[0], a[0])  # a single string is a batch of one
    assert torch.equal(build_tokenizer("clip_bpe", context_length=CTX)(["a photo of a cat"])[0], a[0])


def test_memoised_tokenizer_matches_open_clip_and_its_cache_is_bounded(tok):
    from open_clip.tokenizer import SimpleTokenizer

    from tokzoo.text.tokenizer import CAPTION_CACHE_SIZE, _bpe_ids

    captions = ["a photo of a cat", "", "  Café &amp; CRÈME   brûlée!! ", "dog", LONG, "x" * 200, "a photo of a cat"]
    reference = SimpleTokenizer()(captions, context_length=CTX)
    assert torch.equal(tok(captions), reference)
    assert torch.equal(tok(captions), reference)  # the second call is served from the cache
    info = _bpe_ids.cache_info()
    assert info.hits >= len(captions) and info.maxsize == CAPTION_CACHE_SIZE


def test_tokenizer_bad_input():
    with pytest.raises(ConfigError, match="context_length"):
        build_tokenizer("clip_bpe", context_length=1)
    with pytest.raises(ConfigError, match="lenght"):
        build_tokenizer("clip_bpe", context_lenght=8)
    with pytest.raises(DataError, match="item 1"):
        build_tokenizer("clip_bpe", context_length=8)(["ok", None])


def test_tower_output_shape_and_attributes(tok):
    tower = small_tower(tok.vocab_size)
    out = tower(tok(["a photo of a cat", "dog", LONG]))
    assert out.shape == (3, 24)
    assert tower.width == 32 and tower.embed_dim == 24 and tower.context_length == CTX
    assert not torch.allclose(out.norm(dim=-1), torch.ones(3))  # not normalised: the model does that
    # shorter sequences than the context work too
    assert tower(tok(["dog"])[:, :5]).shape == (1, 24)


@pytest.mark.parametrize("timm_block", [True, False])
def test_tower_is_causal_and_pools_at_eot(tok, monkeypatch, timm_block):
    if timm_block and not tower_module.TIMM_BLOCK_TAKES_MASK:
        pytest.skip("installed timm's Block takes no attention mask")
    monkeypatch.setattr(tower_module, "TIMM_BLOCK_TAKES_MASK", timm_block)
    torch.manual_seed(0)
    tower = small_tower(tok.vocab_size).eval()
    ids = tok(["a photo of a cat"])  # EOT at position 6
    after = ids.clone()
    after[0, 10] = 1234  # below the EOT id, so the pooling position stays the same
    before = ids.clone()
    before[0, 3] = 1234
    with torch.no_grad():
        out, out_after, out_before = tower(ids), tower(after), tower(before)
    assert torch.allclose(out, out_after, atol=1e-6)
    assert not torch.allclose(out, out_before, atol=1e-4)


def test_tower_gradient_flows(tok):
    tower = small_tower(tok.vocab_size)
    tower(tok(["a photo of a cat", "dog"])).pow(2).sum().backward()
    for name, p in tower.named_parameters():
        if name != "token_embedding.weight":
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    used = tok(["a photo of a cat", "dog"]).unique()
    grad = tower.token_embedding.weight.grad
    assert grad[used].abs().sum() > 0
    unused = torch.ones(tok.vocab_size, dtype=torch.bool)
    unused[used] = False
    assert grad[unused].abs().sum() == 0


def test_tower_grad_checkpointing_matches_plain(tok, monkeypatch):
    calls = count_checkpoint_calls(monkeypatch)
    torch.manual_seed(0)
    plain = small_tower(tok.vocab_size)
    ckpt = small_tower(tok.vocab_size, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    ids = tok(["a photo of a cat", "dog"])
    a, b = plain(ids), ckpt(ids)
    assert calls[0] == 2
    assert torch.allclose(a, b, atol=1e-6)
    a.sum().backward()
    b.sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_tower_config_errors(tok):
    with pytest.raises(ConfigError, match="width=30"):
        small_tower(tok.vocab_size, width=30)
    with pytest.raises(ConfigError, match="nheads"):
        small_tower(tok.vocab_size, nheads=4)
    with pytest.raises(ConfigError, match="embed_dim"):
        build_text_tower("transformer", vocab_size=10, context_length=8, width=32, depth=1, heads=4)
    tower = small_tower(tok.vocab_size)
    with pytest.raises(ConfigError, match="context_length"):
        tower(build_tokenizer("clip_bpe", context_length=CTX + 4)(["dog"]))


def test_transformer_unitok_preset_on_meta_device():
    with torch.device("meta"):
        tower = build_text_tower("transformer_unitok")
        shallow = build_text_tower("transformer_unitok", depth=2, context_length=32)
    assert (tower.width, tower.context_length, tower.vocab_size, len(tower.blocks)) == (768, 77, 49408, 12)
    assert tower.blocks[0].attn.num_heads == 12
    assert len(shallow.blocks) == 2 and shallow.context_length == 32 and shallow.width == 768
    out = tower(torch.zeros(2, 77, dtype=torch.long, device="meta"))
    assert out.shape == (2, tower.embed_dim)


def test_tower_under_bf16_autocast_stays_causal(tok):
    torch.manual_seed(0)
    tower = small_tower(tok.vocab_size).eval()
    ids = tok(["a photo of a cat"])
    after = ids.clone()
    after[0, 12] = 777
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, out_after = tower(ids), tower(after)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert torch.equal(out, out_after)


def test_encode_text_trims_padding_without_changing_embeddings(monkeypatch):
    """UnifiedTokenizer.encode_text feeds the tower only up to the batch's longest caption; the embeddings are
    those of the full context length (causal tower, EOT pooling)."""
    from tokzoo.config import defaults, resolve
    from tokzoo.model import UnifiedTokenizer

    torch.manual_seed(0)
    model = UnifiedTokenizer(resolve(defaults())["model"]).eval()
    captions = ["a red star", "a large blue ring in the top left on a striped green background"]
    lengths = []
    forward = model.text_tower.forward
    monkeypatch.setattr(model.text_tower, "forward", lambda ids: lengths.append(ids.shape[1]) or forward(ids))
    with torch.no_grad():
        trimmed = model.encode_text(captions)
        full = torch.nn.functional.normalize(model.text_tower(model.tokenizer(captions)), dim=-1)
    longest = int((model.tokenizer(captions) != 0).sum(1).max())
    assert lengths[0] == -(-longest // 8) * 8 < model.tokenizer.context_length  # next multiple of 8
    torch.testing.assert_close(trimmed, full, rtol=1e-5, atol=1e-6)
