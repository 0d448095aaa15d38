"""Config loading, validation, merging and ablation expansion (tokzoo/config.py), in-process and fast."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from tokzoo.config import (
    DEFAULTS_PATH,
    config_hash,
    defaults,
    flatten,
    load_variants,
    load_yaml,
    merge,
    parse_overrides,
    resolve,
)
from tokzoo.errors import ConfigError

MCQ = {"name": "mcq", "dim": 32, "num_codebooks": 4, "codebook_size": 64}
RQ = {"name": "rq", "dim": 32, "depth": 2, "codebook_size": 64}


def ablation(yaml_file, variants: dict, base: dict | None = None, **top) -> Path:
    return yaml_file("abl.yaml", {"name": "abl", "base": base or {}, "variants": variants, **top})


# ---------------------------------------------------------------- defaults


def test_defaults_load_and_validate():
    cfg = defaults()
    assert set(cfg) >= {"seed", "output_dir", "model", "loss", "optim", "data", "eval", "trainer", "tracking"}
    assert cfg["model"]["quantizer"]["name"] == "mcq"
    assert cfg["loss"]["supervision"] in ("recon", "contra", "both")
    # the defaults are themselves a valid run config; resolving only states what data.augment's `auto` means
    off = {"crop": "center", "flip": False, "resize_short": 1.0}
    assert resolve(copy.deepcopy(cfg)) == {**cfg, "data": {**cfg["data"], "augment": off}}


def test_empty_run_config_gives_the_defaults_as_one_variant(yaml_file):
    path = yaml_file("myrun.yaml", {})
    experiment, variants = load_variants(path)
    assert experiment == "myrun"  # a run config's experiment is its file stem
    assert [v.name for v in variants] == ["myrun"]
    expected = defaults()
    expected["data"]["augment"] = {"crop": "center", "flip": False, "resize_short": 1.0}  # auto, for shapes
    assert variants[0].config == expected
    assert variants[0].seed == defaults()["seed"]


def test_run_config_states_only_what_differs(yaml_file):
    path = yaml_file("run.yaml", {"trainer": {"max_steps": 7}, "model": {"quantizer": {"codebook_size": 128}}})
    (variant,) = load_variants(path)[1]
    assert variant.config["trainer"]["max_steps"] == 7
    assert variant.config["trainer"]["precision"] == defaults()["trainer"]["precision"]
    assert variant.config["model"]["quantizer"] == {**defaults()["model"]["quantizer"], "codebook_size": 128}


# ---------------------------------------------------------------- merge: unknown keys, components, open sections


def test_merge_rejects_unknown_top_level_key_listing_allowed_keys():
    with pytest.raises(ConfigError) as err:
        merge(defaults(), {"trainr": {"max_steps": 3}})
    msg = str(err.value)
    assert "'trainr'" in msg
    for allowed in ("trainer", "model", "loss", "data"):
        assert allowed in msg


def test_merge_names_the_dotted_key_and_the_allowed_keys_of_its_section():
    with pytest.raises(ConfigError) as err:
        merge(defaults(), {"model": {"quantiser": {"name": "rq"}}})
    msg = str(err.value)
    assert "model.quantiser" in msg
    for allowed in ("quantizer", "encoder", "decoder", "factorization", "image_size"):
        assert allowed in msg
    with pytest.raises(ConfigError, match=r"loss\.supervison"):
        merge(defaults(), {"loss": {"supervison": "recon"}})


def test_unknown_key_in_a_variant_is_named(yaml_file):
    path = ablation(yaml_file, {"a": {}, "b": {"optim": {"learning_rate": 1e-3}}})
    with pytest.raises(ConfigError, match=r"optim\.learning_rate.*allowed keys.*\blr\b"):
        load_variants(path)


def test_component_section_is_replaced_when_its_name_changes(yaml_file):
    path = ablation(yaml_file, {"mcq": {}, "rq": {"model": {"quantizer": RQ}}}, base={"model": {"quantizer": MCQ}})
    variants = {v.name: v.config for v in load_variants(path)[1]}
    assert variants["mcq"]["model"]["quantizer"] == MCQ
    assert variants["rq"]["model"]["quantizer"] == RQ  # no num_codebooks inherited from mcq
    assert "num_codebooks" not in variants["rq"]["model"]["quantizer"]


def test_component_section_merges_when_its_name_stays(yaml_file):
    path = ablation(
        yaml_file,
        {
            "big": {"model": {"quantizer": {"codebook_size": 512}}},
            "same_name": {"model": {"quantizer": {"name": "mcq"}}},
        },
        base={"model": {"quantizer": MCQ}},
    )
    variants = {v.name: v.config for v in load_variants(path)[1]}
    assert variants["big"]["model"]["quantizer"] == {**MCQ, "codebook_size": 512}
    assert variants["same_name"]["model"]["quantizer"] == MCQ


def test_component_section_must_be_a_mapping():
    with pytest.raises(ConfigError, match=r"model\.quantizer.*mapping"):
        merge(defaults(), {"model": {"quantizer": "rq"}})


def test_open_sections_accept_new_keys(yaml_file):
    path = yaml_file(
        "run.yaml",
        {
            "trainer": {"gradient_clip_val": 1.0},
            "data": {"kwargs": {"num_train": 64, "anything": "goes"}},
            "model": {"quantizer": {"ema_decay": 0.9, "update": "ema"}, "encoder": {"depth": 1}},
        },
    )
    cfg = load_variants(path)[1][0].config
    assert cfg["trainer"]["gradient_clip_val"] == 1.0
    assert cfg["data"]["kwargs"] == {"num_train": 64, "anything": "goes"}
    assert cfg["model"]["quantizer"]["ema_decay"] == 0.9
    assert cfg["model"]["encoder"] == {"name": "vit_tiny", "depth": 1}


def test_closed_sections_reject_new_keys():
    for bad in ({"data": {"root": "/x"}}, {"eval": {"fid": True}}, {"tracking": {"url": "x"}}):
        with pytest.raises(ConfigError, match="unknown config key"):
            merge(defaults(), bad)


def test_mapping_key_rejects_a_scalar():
    with pytest.raises(ConfigError, match=r"'loss' must be a mapping"):
        merge(defaults(), {"loss": 3})


# ---------------------------------------------------------------- overrides and seeds


def test_dotlist_overrides_apply_to_every_variant_and_win(yaml_file):
    path = ablation(
        yaml_file,
        {"mcq": {"trainer": {"max_steps": 5}}, "rq": {"model": {"quantizer": RQ}}},
        base={"model": {"quantizer": MCQ}},
    )
    _, variants = load_variants(path, ["trainer.max_steps=11", "data.batch_size=4", "optim.lr=0.01"])
    assert [v.name for v in variants] == ["mcq", "rq"]
    for v in variants:
        assert v.config["trainer"]["max_steps"] == 11  # the override beats the variant's own value
        assert v.config["data"]["batch_size"] == 4
        assert v.config["optim"]["lr"] == 0.01
    assert variants[1].config["model"]["quantizer"]["name"] == "rq"


def test_dotlist_override_replacing_a_component_drops_old_arguments(yaml_file):
    path = yaml_file("run.yaml", {"model": {"quantizer": MCQ}})
    cfg = load_variants(path, ["model.quantizer={name: fsq, levels: [5, 3], num_codebooks: 2, dim: 4}"])[1][0].config
    assert cfg["model"]["quantizer"] == {"name": "fsq", "levels": [5, 3], "num_codebooks": 2, "dim": 4}


def test_parse_overrides():
    assert parse_overrides(["trainer.max_steps=5", "loss.supervision=recon"]) == {
        "trainer": {"max_steps": 5},
        "loss": {"supervision": "recon"},
    }
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_overrides(["trainer.max_steps"])


def test_malformed_override_value_is_a_config_error():
    # `{a:b}` (no space after the colon) is not valid YAML flow syntax; OmegaConf lets yaml's error through
    with pytest.raises(ConfigError, match="model.quantizer") as err:
        parse_overrides(["model.quantizer={name:fsq,levels:[8,5,5]}"])
    assert "\n" not in str(err.value)  # one line, like every other config message


def test_unknown_override_key_is_named(yaml_file):
    path = yaml_file("run.yaml", {})
    with pytest.raises(ConfigError, match=r"trainer_steps"):
        load_variants(path, ["trainer_steps=3"])


def test_seeds_expand_every_variant(yaml_file):
    path = ablation(yaml_file, {"mcq": {}, "rq": {"model": {"quantizer": RQ}}}, seeds=[0, 1, 2])
    _, variants = load_variants(path)
    assert [v.name for v in variants] == [f"{q}/seed{s}" for q in ("mcq", "rq") for s in (0, 1, 2)]
    assert [v.seed for v in variants] == [0, 1, 2, 0, 1, 2]
    assert [v.config["seed"] for v in variants] == [0, 1, 2, 0, 1, 2]
    assert len({v.config_hash for v in variants}) == 6  # the seed is part of what is computed


def test_single_seed_keeps_variant_names(yaml_file):
    path = ablation(yaml_file, {"mcq": {}}, seeds=[7])
    (v,) = load_variants(path)[1]
    assert (v.name, v.seed) == ("mcq", 7)


@pytest.mark.parametrize("seeds", [[], "0,1", [0, "1"]])
def test_bad_seeds_are_rejected(yaml_file, seeds):
    with pytest.raises(ConfigError, match="seeds"):
        load_variants(ablation(yaml_file, {"mcq": {}}, seeds=seeds))


def test_ablation_without_variants_runs_the_base(yaml_file):
    path = yaml_file("abl.yaml", {"base": {"trainer": {"max_steps": 4}}})
    experiment, variants = load_variants(path)
    assert experiment == "abl"
    assert [v.name for v in variants] == ["base"]
    assert variants[0].config["trainer"]["max_steps"] == 4


def test_ablation_base_may_be_a_relative_path(tmp_path, yaml_file):
    yaml_file("bases/small.yaml", {"trainer": {"max_steps": 9}, "model": {"quantizer": MCQ}})
    path = yaml_file(
        "abl.yaml", {"name": "x", "base": "bases/small.yaml", "variants": {"rq": {"model": {"quantizer": RQ}}}}
    )
    (v,) = load_variants(path)[1]
    assert v.config["trainer"]["max_steps"] == 9
    assert v.config["model"]["quantizer"] == RQ


def test_ablation_rejects_unknown_top_level_keys(yaml_file):
    with pytest.raises(ConfigError) as err:
        load_variants(ablation(yaml_file, {"mcq": {}}, variant={"rq": {}}))
    msg = str(err.value)
    assert "variant" in msg and "variants" in msg and "seeds" in msg


def test_variant_must_be_a_mapping(yaml_file):
    with pytest.raises(ConfigError, match="variant 'mcq'"):
        load_variants(ablation(yaml_file, {"mcq": 3}))


def test_experiment_name_from_file_then_tracking(yaml_file):
    path = ablation(yaml_file, {"mcq": {}})
    assert load_variants(path)[0] == "abl"
    assert load_variants(path, ["tracking.experiment=other"])[0] == "other"
    path = ablation(yaml_file, {"mcq": {}}, base={"tracking": {"experiment": "from_base"}})
    assert load_variants(path)[0] == "from_base"


def test_interpolations_are_resolved(yaml_file):
    path = yaml_file(
        "run.yaml", {"model": {"quantizer": {"codebook_size": "${data.batch_size}"}}, "data": {"batch_size": 16}}
    )
    assert load_variants(path)[1][0].config["model"]["quantizer"]["codebook_size"] == 16


# ---------------------------------------------------------------- types and values


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("trainer.max_steps=abc", "trainer.max_steps", "int"),
        ("trainer.max_steps=0", "trainer.max_steps", ">= 1"),
        ("data.batch_size=2.5", "data.batch_size", "int"),
        ("optim.lr=fast", "optim.lr", "float"),
        ("optim.lr=-1", "optim.lr", ">= 0"),
        ("seed=true", "seed", "int"),  # a bool is not an int here
        ("eval.zero_shot=maybe", "eval.zero_shot", "bool"),
        ("optim.warmup_steps=1.5", "optim.warmup_steps", "int"),
    ],
)
def test_wrong_types_name_the_key_and_what_is_allowed(yaml_file, override, key, expected):
    path = yaml_file("run.yaml", {})
    with pytest.raises(ConfigError) as err:
        load_variants(path, [override])
    msg = str(err.value)
    assert f"'{key}'" in msg
    assert expected in msg


def test_int_is_accepted_where_a_float_is_expected(yaml_file):
    cfg = load_variants(yaml_file("run.yaml", {}), ["optim.lr=1", "loss.quant_weight=2"])[1][0].config
    assert cfg["optim"]["lr"] == 1 and cfg["loss"]["quant_weight"] == 2


def test_unknown_supervision_lists_the_allowed_values(yaml_file):
    with pytest.raises(ConfigError) as err:
        load_variants(yaml_file("run.yaml", {}), ["loss.supervision=foo"])
    msg = str(err.value)
    assert "loss.supervision" in msg and "'foo'" in msg
    for allowed in ("recon", "contra", "both"):
        assert allowed in msg


def test_component_needs_a_name(yaml_file):
    path = ablation(yaml_file, {"bad": {"model": {"encoder": {"name": None}}}})
    with pytest.raises(ConfigError, match=r"model\.encoder.*name"):
        load_variants(path)


def test_gan_without_reconstruction_is_rejected(yaml_file):
    with pytest.raises(ConfigError, match="gan_weight"):
        load_variants(yaml_file("run.yaml", {"loss": {"supervision": "contra", "gan_weight": 0.4}}))


# ---------------------------------------------------------------- files


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nbase:\n  trainer:\n    max_steps: [3\nvariants: {}\n")
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    msg = str(err.value)
    assert str(path) in msg
    line = re.search(r"line (\d+)", msg)
    assert line is not None and int(line.group(1)) in (4, 5)  # where the unclosed list starts / is detected


def test_yaml_tab_indentation_error_gives_line(tmp_path):
    path = tmp_path / "tabs.yaml"
    path.write_text("trainer:\n\tmax_steps: 3\n")
    with pytest.raises(ConfigError, match=r"line 2"):
        load_variants(path)


def test_missing_file_is_a_config_error(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        load_variants(missing)
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path)  # a directory is not a config file


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_variants(path)


def test_yaml_tags_are_not_executed(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("seed: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(path)


def test_shipped_ablation_loads():
    path = Path(__file__).resolve().parents[1] / "ablations" / "mcq_vs_rq.yaml"
    experiment, variants = load_variants(path, ["trainer.max_steps=2"])
    assert experiment == "mcq_vs_rq"
    assert {v.name: v.config["model"]["quantizer"]["name"] for v in variants} == {"mcq": "mcq", "rq": "rq"}
    assert "num_codebooks" not in variants[1].config["model"]["quantizer"]
    assert all(v.config["trainer"]["max_steps"] == 2 for v in variants)


def test_default_yaml_is_plain_data():
    assert yaml.safe_load(DEFAULTS_PATH.read_text()) == defaults()


# ---------------------------------------------------------------- hash and flatten


def test_config_hash_is_stable_and_ignores_key_order():
    cfg = defaults()
    h = config_hash(cfg)
    assert re.fullmatch(r"[0-9a-f]{12}", h)
    assert config_hash(copy.deepcopy(cfg)) == h
    reordered = {k: cfg[k] for k in reversed(list(cfg))}
    reordered["model"] = {k: cfg["model"][k] for k in reversed(list(cfg["model"]))}
    assert config_hash(reordered) == h


def test_config_hash_sees_what_is_computed():
    cfg = defaults()
    changed = copy.deepcopy(cfg)
    changed["model"]["quantizer"]["codebook_size"] += 1
    assert config_hash(changed) != config_hash(cfg)
    changed = copy.deepcopy(cfg)
    changed["loss"]["supervision"] = "recon"
    assert config_hash(changed) != config_hash(cfg)


def test_config_hash_ignores_where_results_go():
    cfg = defaults()
    moved = copy.deepcopy(cfg)
    moved["output_dir"] = "/somewhere/else"
    moved["tracking"] = {"uri": "http://host:5000", "experiment": "other"}
    assert config_hash(moved) == config_hash(cfg)


def test_variant_hash_matches_its_config(yaml_file):
    path = ablation(yaml_file, {"mcq": {}, "rq": {"model": {"quantizer": RQ}}})
    a, b = load_variants(path)[1]
    assert a.config_hash == config_hash(a.config) != b.config_hash


def test_flatten():
    flat = flatten({"model": {"quantizer": {"name": "mcq", "dim": 32}, "levels": [8, 5]}, "seed": 0, "kw": {}})
    assert flat == {
        "model.quantizer.name": "mcq",
        "model.quantizer.dim": 32,
        "model.levels": [8, 5],
        "seed": 0,
        "kw": {},
    }


def test_flatten_defaults_covers_every_leaf():
    flat = flatten(defaults())
    assert flat["model.quantizer.name"] == "mcq"
    assert flat["trainer.max_steps"] == defaults()["trainer"]["max_steps"]
    assert flat["data.kwargs"] == {}
    assert not any(isinstance(v, dict) and v for v in flat.values())
