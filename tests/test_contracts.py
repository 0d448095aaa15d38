"""Contract tests: one parametrized set per component kind, over the registry's names (test id = registry name, so
`pytest -k fsq` runs fsq's). Each component is built from the example arguments registered beside it; one that
registered none fails here, by name, instead of silently going untested. A new component gets these for free.

Contracts (../shared/docs/ARCHITECTURE.md "Public Python contract"): quantizers (B, N, dim) -> z_q (B, N, dim),
indices (B, N, C) int64, scalar loss, stats, decode == z_q in eval (a quantizer that sets `num_tokens`, msrq's
square grid, gets that many tokens per sample); factorizations (B, N, in) -> (B, N, out);
encoders (B, 3, H, W) -> (B, N, width) and decoders back; tokenizers str -> ids; text towers ids -> (B, embed_dim);
datasets yield what the DataModule collates.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Mapping

import pytest
import torch
from component_checks import STAT_KEYS, check_bf16_autocast, check_index_ranges, check_invariants, tokens
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokzoo.backbones import DECODERS, ENCODERS
from tokzoo.data import DATASETS, collate_samples
from tokzoo.errors import ConfigError
from tokzoo.factorization import FACTORIZATIONS
from tokzoo.quantizers import QUANTIZERS
from tokzoo.registry import Registry, accepted_arguments
from tokzoo.text import TEXT_TOWERS, TOKENIZERS

REGISTRIES = {
    "quantizer": QUANTIZERS,
    "factorization": FACTORIZATIONS,
    "encoder": ENCODERS,
    "decoder": DECODERS,
    "tokenizer": TOKENIZERS,
    "text_tower": TEXT_TOWERS,
    "dataset": DATASETS,
}
# every registered component of every kind, id "kind-name" (encoders and decoders share names)
COMPONENTS = [pytest.param(kind, name, id=f"{kind}-{name}") for kind, reg in REGISTRIES.items() for name in reg.names()]
CAPTIONS = ["a photo of a cat", "dog", "a very long caption about a small brown dog that runs after a red ball"]
HYPOTHESIS = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def build(registry: Registry, name: str, folder=None, **overrides):
    return registry.build(name, **{**registry.example(name, folder), **overrides})


# ---- every registry: an example per component, readable errors ---------------------------------------------
@pytest.mark.parametrize("kind, name", [c for c in COMPONENTS if c.values[0] != "dataset"])
def test_component_builds_on_the_meta_device(kind: str, name: str, tmp_path) -> None:
    """`tokzoo fit` checks every variant up front by building its model on the meta device (runner.check_variant):
    a constructor that reads a tensor's value (e.g. int(t.sum())) would fail there."""
    registry = REGISTRIES[kind]
    example = registry.example(name, tmp_path)
    with torch.device("meta"):
        registry.build(name, **example)


@pytest.mark.parametrize("kind, name", COMPONENTS)
def test_component_has_example_arguments(kind: str, name: str, tmp_path) -> None:
    registry = REGISTRIES[kind]
    example = registry.example(name, tmp_path)  # raises ConfigError naming a component registered without one
    assert isinstance(example, dict)
    assert set(example) <= set(accepted_arguments(registry.get(name)))


@pytest.mark.parametrize("kind, name", COMPONENTS)
def test_unknown_argument_names_itself_and_the_accepted_ones(kind: str, name: str, tmp_path) -> None:
    registry = REGISTRIES[kind]
    example = registry.example(name, tmp_path)
    with pytest.raises(ConfigError) as err:
        registry.build(name, **example, no_such_argument=1)
    msg = str(err.value)
    assert f"'{name}'" in msg and "no_such_argument" in msg
    for key in example:
        assert key in msg.split("accepted:")[1], key


@pytest.mark.parametrize("kind", REGISTRIES)
def test_unknown_name_lists_every_allowed_name(kind: str) -> None:
    registry = REGISTRIES[kind]
    assert registry.names() and registry.names() == sorted(registry.names())
    with pytest.raises(ConfigError) as err:
        registry.build("no_such_component")
    assert f"unknown {registry.kind} 'no_such_component'" in str(err.value)
    for name in REGISTRIES[kind].names():
        assert name in str(err.value)


def test_missing_example_fails_loudly_naming_the_component() -> None:
    registry = Registry("gadget")
    registry.register("bare")(dict)
    registry.register("files", example=lambda folder: {"root": str(folder)})(dict)
    with pytest.raises(ConfigError, match="gadget 'bare' has no example"):
        registry.example("bare")
    with pytest.raises(ConfigError, match="pass example"):
        registry.example("files")  # writes files: needs a folder
    with pytest.raises(ConfigError, match="unknown gadget 'nope'"):
        registry.example("nope")
    with pytest.raises(ConfigError, match="typo"):  # a dict example is checked against the signature at import
        registry.register("checked", example=dict(typo=1))(lambda size=1: size)


def test_examples_are_fresh_copies() -> None:
    name = QUANTIZERS.names()[0]
    first = QUANTIZERS.example(name)
    first["mutated"] = True
    assert "mutated" not in QUANTIZERS.example(name)


# ---- quantizers --------------------------------------------------------------------------------------------
quantizer_names = pytest.mark.parametrize("name", QUANTIZERS.names())


def discrete(name: str) -> bool:
    return not QUANTIZERS.get(name).continuous


@quantizer_names
def test_quantizer_output_contract(name: str) -> None:
    for dtype, training in itertools.product((torch.float32, torch.float64), (True, False)):
        q = build(QUANTIZERS, name).train(training)
        z = torch.randn(3, tokens(q, 5), q.dim, dtype=dtype)
        out = q(z)
        assert out.z_q.shape == z.shape and out.z_q.dtype == dtype
        assert out.indices.shape == (3, z.shape[1], len(q.codebook_sizes)) and out.indices.dtype == torch.int64
        assert q.num_codes_per_token == len(q.codebook_sizes)
        assert out.loss.shape == () and torch.isfinite(out.loss)
        assert isinstance(out.stats, Mapping)
        check_index_ranges(q, out.indices)
        if discrete(name):
            assert set(STAT_KEYS) <= set(out.stats)
            assert 0.0 <= float(out.stats["usage"]) <= 1.0
            assert float(out.stats["dead_codes"]) == pytest.approx(1 - float(out.stats["usage"]))


@quantizer_names
def test_quantizer_rejects_inputs_of_the_wrong_shape(name: str) -> None:
    q = build(QUANTIZERS, name)
    with pytest.raises(ConfigError, match=f"\\(B, N, {q.dim}\\)"):
        q(torch.randn(2, 3, q.dim + 1))
    with pytest.raises(ConfigError):
        q(torch.randn(6, q.dim))


@quantizer_names
def test_quantizer_decode_equals_z_q_in_eval(name: str) -> None:
    q = build(QUANTIZERS, name).train()
    for _ in range(3):  # move EMA codebooks / trackers a little first; decode must follow the current codes
        q(torch.randn(4, tokens(q, 6), q.dim))
    q.eval()
    z = torch.randn(4, tokens(q, 6), q.dim) * 2
    out = q(z)
    if not discrete(name):  # continuous: nothing to decode, no vocabulary
        assert q.codebook_sizes == [] and out.indices.shape == (4, 6, 0)
        assert math.isinf(q.bits_per_token)
        with pytest.raises(ValueError, match="continuous"):
            q.decode(out.indices)
        return
    decoded = q.decode(out.indices)
    assert decoded.shape == z.shape
    torch.testing.assert_close(decoded, out.z_q, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out.z_q, z)  # it really quantized


@quantizer_names
def test_quantizer_straight_through_gradient_reaches_input(name: str) -> None:
    q = build(QUANTIZERS, name).train()
    z = torch.randn(3, tokens(q, 4), q.dim, requires_grad=True)
    q(z).z_q.sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert (z.grad != 0).any()


@quantizer_names
def test_quantizer_bits_per_token_and_shape_label(name: str) -> None:
    q = build(QUANTIZERS, name)
    if not discrete(name):
        assert math.isinf(q.bits_per_token) and q.shape_label == f"continuous {q.dim}-d"
        return
    assert q.bits_per_token == pytest.approx(sum(math.log2(k) for k in q.codebook_sizes))
    sizes = q.codebook_sizes
    expected = f"{len(sizes)}x{sizes[0]}" if len(set(sizes)) == 1 else "+".join(map(str, sizes))
    assert q.shape_label == expected


@quantizer_names
def test_quantizer_state_dict_round_trip(name: str) -> None:
    q = build(QUANTIZERS, name).train()
    for _ in range(3):
        q(torch.randn(4, tokens(q, 6), q.dim))
    torch.manual_seed(1)  # a different initialisation, overwritten by the load
    fresh = build(QUANTIZERS, name)
    fresh.load_state_dict(copy.deepcopy(q.state_dict()))  # strict: the same keys
    z = torch.randn(4, tokens(q, 6), q.dim)
    a, b = q.eval()(z), fresh.eval()(z)
    assert torch.equal(a.z_q, b.z_q) and torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.loss, b.loss)
    assert a.stats.keys() == b.stats.keys()
    for key in a.stats:
        assert torch.equal(a.stats[key], b.stats[key]), key


@quantizer_names
def test_quantizer_statistics_only_move_in_training(name: str) -> None:
    q = build(QUANTIZERS, name).eval()
    before = q(torch.randn(2, tokens(q, 6), q.dim)).stats
    state = copy.deepcopy(q.state_dict())
    q(torch.randn(2, tokens(q, 6), q.dim))
    for key, value in q.state_dict().items():
        assert torch.equal(value, state[key]), key
    if discrete(name):
        assert float(before["usage"]) == 0.0 and float(before["dead_codes"]) == 1.0
        after = q.train()(torch.randn(2, tokens(q, 6), q.dim)).stats
        assert float(after["usage"]) > 0.0


@quantizer_names
def test_quantizer_codebook_parameters_are_exactly_the_codebooks(name: str) -> None:
    """The codebook tensors are the learnable tensors that decode reads: what decode(indices) has a gradient for."""
    q = build(QUANTIZERS, name).train()
    returned = q.codebook_parameters()
    own = {id(p) for p in q.parameters()}
    assert all(isinstance(p, torch.nn.Parameter) and id(p) in own for p in returned)
    assert len({id(p) for p in returned}) == len(returned)
    if not discrete(name):
        assert returned == []
        return
    out = q(torch.randn(2, tokens(q, 6), q.dim))
    q.zero_grad()
    decoded = q.decode(out.indices)
    if decoded.requires_grad:  # else (lfq, fsq, EMA codebooks) decode reads no learnable tensor
        decoded.pow(2).sum().backward()
    read_by_decode = {id(p) for p in q.parameters() if p.grad is not None and (p.grad != 0).any()}
    assert {id(p) for p in returned} == read_by_decode


@quantizer_names
def test_quantizer_bf16_autocast(name: str) -> None:
    check_bf16_autocast(build(QUANTIZERS, name))


@quantizer_names
@HYPOTHESIS
@given(b=st.integers(1, 3), n=st.integers(1, 6), seed=st.integers(0, 2**16), scale=st.sampled_from([0.1, 1.0, 5.0]))
def test_quantizer_invariants_on_random_inputs(name: str, b: int, n: int, seed: int, scale: float) -> None:
    if discrete(name):
        q = build(QUANTIZERS, name)
        check_invariants(q, b, tokens(q, n), seed, scale)
    else:
        z = torch.randn(b, n, build(QUANTIZERS, name).dim) * scale
        assert torch.equal(build(QUANTIZERS, name)(z).z_q, z)


# ---- factorizations ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FACTORIZATIONS.names())
def test_factorization_maps_widths_with_gradients(name: str) -> None:
    example = FACTORIZATIONS.example(name)
    i, o = example["in_dim"], example["out_dim"]
    # the down-projection, the up-projection back, and equal widths (continuous baselines)
    for in_dim, out_dim in dict.fromkeys([(i, o), (o, i), (i, i)]):
        f = FACTORIZATIONS.build(name, **{**example, "in_dim": in_dim, "out_dim": out_dim})
        x = torch.randn(2, 5, in_dim, requires_grad=True)
        y = f(x)
        assert y.shape == (2, 5, out_dim) and y.dtype == torch.float32
        assert f.in_dim == in_dim and f.out_dim == out_dim
        y.pow(2).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        assert all(p.grad is not None for p in f.parameters())
        assert f.double()(x.double()).dtype == torch.float64


@pytest.mark.parametrize("name", FACTORIZATIONS.names())
def test_factorization_rejects_bad_dims(name: str) -> None:
    example = FACTORIZATIONS.example(name)
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ConfigError, match="in_dim"):
            FACTORIZATIONS.build(name, **{**example, "in_dim": bad})
        with pytest.raises(ConfigError, match="out_dim"):
            FACTORIZATIONS.build(name, **{**example, "out_dim": bad})


# ---- backbones ---------------------------------------------------------------------------------------------
def images_for(encoder) -> torch.Tensor:
    return torch.rand(2, 3, encoder.image_size, encoder.image_size) * 2 - 1


def assert_every_parameter_learns(*modules: torch.nn.Module) -> None:
    for module in modules:
        for pname, p in module.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
            assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", ENCODERS.names())
def test_encoder_maps_images_to_tokens(name: str, tmp_path) -> None:
    enc = build(ENCODERS, name, tmp_path)
    tokens = enc(images_for(enc))
    assert tokens.shape == (2, enc.num_tokens, enc.width) and torch.isfinite(tokens).all()
    # a random readout: the sum of squares of a fresh LayerNorm's output is constant, so it has no gradient
    (tokens * torch.randn_like(tokens)).sum().backward()
    assert_every_parameter_learns(enc)
    with pytest.raises(ConfigError, match="image_size"):
        enc(torch.randn(1, 3, 2 * enc.image_size, 2 * enc.image_size))


@pytest.mark.parametrize("name", DECODERS.names())
def test_decoder_maps_tokens_to_images(name: str) -> None:
    dec = build(DECODERS, name)
    images = dec(torch.randn(2, dec.num_tokens, dec.width))
    assert images.shape == (2, 3, dec.image_size, dec.image_size) and torch.isfinite(images).all()
    images.pow(2).mean().backward()
    assert_every_parameter_learns(dec)
    assert isinstance(dec.last_layer_weight, torch.nn.Parameter) and dec.last_layer_weight.grad is not None
    with pytest.raises(ConfigError, match="width"):
        dec(torch.randn(1, dec.num_tokens, dec.width + 1))


@pytest.mark.parametrize("name", sorted(set(ENCODERS.names()) & set(DECODERS.names())))
def test_decoder_of_encoder_round_trip(name: str) -> None:
    enc, dec = build(ENCODERS, name), build(DECODERS, name)
    images = images_for(enc)
    recon = dec(enc(images))
    assert recon.shape == images.shape
    (recon - images).pow(2).mean().backward()
    assert_every_parameter_learns(enc, dec)


# ---- tokenizers and text towers ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", TOKENIZERS.names())
def test_tokenizer_maps_captions_to_ids(name: str) -> None:
    tok = build(TOKENIZERS, name)
    ids = tok(CAPTIONS)
    assert ids.shape == (3, tok.context_length) and ids.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) < tok.vocab_size
    assert torch.equal(tok(CAPTIONS), ids)  # deterministic
    assert torch.equal(tok(CAPTIONS[0]), ids[:1])  # a single string is a batch of one
    assert not torch.equal(ids[0], ids[1])


@pytest.mark.parametrize("name", TEXT_TOWERS.names())
def test_text_tower_maps_ids_to_embeddings(name: str, tmp_path) -> None:
    tower = build(TEXT_TOWERS, name, tmp_path)
    ids = torch.randint(0, tower.vocab_size, (3, tower.context_length))
    emb = tower(ids)
    assert emb.shape == (3, tower.embed_dim) and torch.isfinite(emb).all()
    assert tower(ids[:, : max(1, tower.context_length // 2)]).shape == (3, tower.embed_dim)  # shorter is fine
    emb.pow(2).sum().backward()
    for pname, p in tower.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    with pytest.raises(ConfigError, match="context_length"):
        tower(torch.zeros(1, tower.context_length + 1, dtype=torch.long))


@pytest.mark.parametrize("name", TEXT_TOWERS.names())
def test_text_tower_reads_every_tokenizer(name: str, tmp_path) -> None:
    if getattr(TEXT_TOWERS.get(name), "brings_tokenizer", False):  # it reads its own tokenizer's ids
        tower = build(TEXT_TOWERS, name, tmp_path)
        assert tower(tower.tokenizer(CAPTIONS)).shape == (3, tower.embed_dim)
        return
    for tok_name in TOKENIZERS.names():
        tok = build(TOKENIZERS, tok_name)
        tower = build(TEXT_TOWERS, name, vocab_size=tok.vocab_size, context_length=tok.context_length)
        assert tower(tok(CAPTIONS)).shape == (3, tower.embed_dim), tok_name


# ---- datasets ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", DATASETS.names())
def test_dataset_items_are_what_the_datamodule_collates(name: str, tmp_path) -> None:
    size = 32
    example = DATASETS.example(name, tmp_path)
    for split in ("train", "val"):
        ds = DATASETS.build(name, split=split, image_size=size, **example)
        if isinstance(ds, torch.utils.data.IterableDataset):
            items = list(itertools.islice(iter(ds), 4))
        else:
            assert len(ds) >= 1
            items = [ds[i] for i in range(min(4, len(ds)))]
        assert items and all(item is not None for item in items), split
        names = ds.class_names
        assert names is None or (names and all(isinstance(n, str) for n in names))
        assert ds.prompt_templates and all(t.count("{}") == 1 for t in ds.prompt_templates)
        for item in items:
            image, label = item["image"], item["label"]
            assert image.shape == (3, size, size) and image.dtype == torch.float32
            assert -1.0 <= float(image.min()) and float(image.max()) <= 1.0
            assert isinstance(item["caption"], str) and item["caption"]
            assert isinstance(label, int) and not isinstance(label, bool)
            assert label >= -1 and (names is None or label < len(names))  # -1: unknown
        batch = collate_samples(items)
        assert batch["image"].shape == (len(items), 3, size, size) and batch["skipped"] == 0
        assert batch["label"].dtype == torch.long and len(batch["caption"]) == len(items)
