"""The generation probe: its prior recovers a known entropy rate, its samples respect the requested classes'
conditioning, guidance works, seeded runs repeat, and the Frechet distance is the textbook one."""

from __future__ import annotations

import math

import pytest
import torch

from tokzoo.errors import ConfigError
from tokzoo.generation.prior import TokenPrior
from tokzoo.generation.probe import EncodedSplit, held_out_bits, train_prior
from tokzoo.generation.reference import frechet_distance

SIZES = [8, 4]  # two codes per position: a Markov chain over positions (slot 0) and a code that depends on it (slot 1)
POSITIONS, CLASSES = 12, 3


def markov_source(seed: int = 0):
    """A class-conditional Markov chain over positions with a dependent second code inside each position."""
    g = torch.Generator().manual_seed(seed)
    dirichlet = lambda shape, a: torch.distributions.Dirichlet(torch.full(shape, a)).sample()
    torch.manual_seed(seed)
    start = dirichlet((CLASSES, SIZES[0]), 0.5)  # p(x_0 | y)
    trans = dirichlet((CLASSES, SIZES[0], SIZES[0]), 0.3)  # p(x_n | x_{n-1}, y)
    inner = dirichlet((SIZES[0], SIZES[1]), 0.4)  # p(z_n | x_n)

    def draw(count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y = torch.randint(0, CLASSES, (count,), generator=g)
        x = torch.zeros(count, POSITIONS, dtype=torch.long)
        x[:, 0] = torch.multinomial(start[y], 1, generator=g).squeeze(1)
        for n in range(1, POSITIONS):
            x[:, n] = torch.multinomial(trans[y, x[:, n - 1]], 1, generator=g).squeeze(1)
        z = torch.multinomial(inner[x.flatten()], 1, generator=g).view(count, POSITIONS)
        codes = torch.stack([x, z], dim=-1)
        # the exact NLL of each sequence under the source, in bits
        logp = start[y, x[:, 0]].log() + inner[x, z].log().sum(1)
        logp += trans[y[:, None], x[:, :-1], x[:, 1:]].log().sum(1)
        return codes, y, -logp / math.log(2)

    return draw


def split(codes: torch.Tensor, labels: torch.Tensor) -> EncodedSplit:
    return EncodedSplit(codes, labels, torch.zeros(len(codes), 3, 2, 2, dtype=torch.uint8))


def trained_prior(train: EncodedSplit, steps: int = 600, seed: int = 0, class_dropout: float = 0.0) -> TokenPrior:
    torch.manual_seed(seed)
    prior = TokenPrior(SIZES, POSITIONS, CLASSES, width=64, depth=2, heads=4, class_dropout=class_dropout)
    train_prior(prior, train, {"steps": steps, "batch_size": 128, "lr": 3e-3}, seed=seed, conditional=True)
    return prior


@pytest.fixture(scope="module")
def source():
    draw = markov_source()
    train_codes, train_y, _ = draw(6000)
    test_codes, test_y, true_bits = draw(2000)
    return split(train_codes, train_y), split(test_codes, test_y), true_bits


def test_held_out_bits_come_within_5_percent_of_the_true_entropy_rate(source) -> None:
    train, test, true_bits = source
    prior = trained_prior(train)
    learned = held_out_bits(prior, test, conditional=True)
    entropy = float(true_bits.mean())  # the source's entropy per image, estimated on the same held-out draws
    assert learned >= entropy - 0.05 * entropy  # a model cannot beat the source by more than estimation noise
    assert abs(learned - entropy) / entropy < 0.05, (learned, entropy)
    assert learned < prior.uniform_bits_per_image


def test_seeded_training_repeats_exactly(source) -> None:
    train, test, _ = source
    small = split(train.codes[:512], train.labels[:512])
    a = held_out_bits(trained_prior(small, steps=20), test, conditional=True)
    b = held_out_bits(trained_prior(small, steps=20), test, conditional=True)
    assert a == b


def test_samples_follow_their_class_and_guidance_sharpens_them(source) -> None:
    """The first code of class-conditional samples follows that class's start distribution; with cfg > 0 the
    samples' likelihood under their own class rises against the other classes."""
    train, _, _ = source
    prior = trained_prior(train, class_dropout=0.15)
    labels = torch.arange(CLASSES).repeat(200)
    g = torch.Generator().manual_seed(0)
    codes = prior.sample(labels, generator=g)
    assert codes.shape == (len(labels), POSITIONS, len(SIZES))
    assert int(codes[..., 0].max()) < SIZES[0] and int(codes[..., 1].max()) < SIZES[1]

    def own_class_margin(c: torch.Tensor) -> float:
        with torch.no_grad():
            per_class = torch.stack([prior.bits_per_image(c, torch.full_like(labels, k)) for k in range(CLASSES)], 1)
        return float((per_class.gather(1, labels[:, None]).squeeze(1) - per_class.mean(1)).mean())

    plain = own_class_margin(codes)
    guided = own_class_margin(prior.sample(labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(0)))
    assert plain < 0  # fewer bits under the intended class than on average
    assert guided < plain


def test_prior_refuses_codes_of_the_wrong_shape() -> None:
    prior = TokenPrior(SIZES, POSITIONS, CLASSES, width=32, depth=1, heads=2)
    with pytest.raises(ConfigError, match="expects codes"):
        prior.nll_bits(torch.zeros(2, POSITIONS + 1, 2, dtype=torch.long))
    with pytest.raises(ConfigError, match="continuous"):
        TokenPrior([], POSITIONS)


def test_frechet_distance_matches_the_closed_form_for_gaussians() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    b = torch.randn(20000, 3, generator=g, dtype=torch.float64) * 2 + torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    # N(0, I) vs N(mu, 4I): |mu|^2 + tr(I + 4I - 2 * 2I) = 1 + 3
    assert frechet_distance(a, b) == pytest.approx(4.0, rel=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


# ---- the probe in a real run, and `tokzoo probe-gen` on it ----------------------------------------------------
PROBE = {"steps": 4, "samples": 20, "train_images": 96, "width": 32, "heads": 2, "grid_per_class": 2}


def test_a_continuous_quantizer_gets_every_generation_metric_marked_absent(tmp_path) -> None:
    from tokzoo.config import defaults, merge, resolve
    from tokzoo.generation.probe import GENERATION_METRICS, run_probe
    from tokzoo.model import UnifiedTokenizer

    config = resolve(merge(defaults(), {"model": {"quantizer": {"name": "none"}}, "eval": {"generation": PROBE}}))
    result = run_probe(UnifiedTokenizer(config["model"]), None, config, {})
    assert set(result.absent) == set(GENERATION_METRICS) and not result.metrics
    assert all("continuous" in why for why in result.absent.values())


@pytest.mark.slow
def test_fit_runs_the_probe_and_probe_gen_repeats_it_exactly(tmp_path) -> None:
    import mlflow
    from conftest import run_tokzoo, sqlite_uri, tiny_ablation

    variants = {"mcq": {"model": {"quantizer": {"name": "mcq", "dim": 32, "num_codebooks": 4, "codebook_size": 64}}}}
    path = tiny_ablation(tmp_path, variants, name="gen")
    overrides = [f"eval.generation.{k}={v}" for k, v in PROBE.items()]
    proc = run_tokzoo(["fit", str(path), *overrides], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gen bits" in proc.stdout or "val/gen_bit" in proc.stdout  # the fit summary shows the generation columns
    client = mlflow.MlflowClient(sqlite_uri(tmp_path))
    (run,) = client.search_runs([client.get_experiment_by_name("gen").experiment_id])
    m = run.data.metrics
    # a 4-step prior is barely trained: the uniform bound is checked on the trained synthetic prior above
    assert 0 < m["val/gen_bits_per_image"] < 2 * m["val/gen_uniform_bits_per_image"]
    assert m["val/gen_bits_per_token"] == pytest.approx(m["val/gen_bits_per_image"] / 64)  # 8 x 8 positions
    assert 0 <= m["val/gen_class_acc"] <= 1 and 0 <= m["val/gen_ref_acc"] <= 1 and m["val/gen_fd_ref"] >= 0
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "gen_samples.png" in artifacts
    assert "absent.val/gfid" in run.data.tags or "val/gfid" in m  # Inception weights: present or said why not

    again = run_tokzoo(["probe-gen", "gen", "--variant", "mcq"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    history = client.get_metric_history(run.info.run_id, "val/gen_bits_per_image")
    assert len(history) == 2 and history[0].value == history[1].value  # seeded: the same codes, prior and bits
    missing = run_tokzoo(["probe-gen", "gen", "--variant", "nope"], tmp_path)
    assert missing.returncode == 2 and "has no finished variant 'nope'" in " ".join(missing.stderr.split())
