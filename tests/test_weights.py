import socket
import time
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.hub
from torch import nn

from tokzoo.errors import ConfigError, TokzooError
from tokzoo.weights import (
    WEIGHTS,
    download_weights,
    exclude_from_checkpoint,
    find_weights,
    hub_weights,
    weight_status,
    weights_available,
)


@pytest.fixture
def empty_home(tmp_path, monkeypatch) -> Path:
    """TORCH_HOME pointing at an empty dir, no TOKZOO_WEIGHTS, no explicit torch.hub dir."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("TOKZOO_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return tmp_path


def test_registry_names_the_files_the_libraries_load():
    assert WEIGHTS["lpips_vgg"].filename == "vgg16-397923af.pth"
    assert WEIGHTS["inception_fid"].filename == "weights-inception-2015-12-05-6726825d.pth"
    # the same URLs the installed libraries would fetch, so a warm cache written by either is found
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    from torchvision.models import VGG16_Weights

    assert WEIGHTS["lpips_vgg"].url == VGG16_Weights.IMAGENET1K_V1.url
    assert WEIGHTS["inception_fid"].url == URL_INCEPTION_V3


def test_status_in_empty_torch_home_lists_absent_files_with_paths(empty_home):
    rows = {r["name"]: r for r in weight_status()}
    assert {"lpips_vgg", "inception_fid"} <= set(rows)
    expected_dir = empty_home / "torch" / "hub" / "checkpoints"
    for name, row in rows.items():
        assert row["present"] is False
        assert row["path"] == str(expected_dir / WEIGHTS[name].filename)
        assert row["url"].startswith("https://")
        ok, reason = weights_available(name)
        assert not ok and str(expected_dir) in reason and "tokzoo weights --download" in reason


def test_tokzoo_weights_dir_is_searched_first(empty_home, monkeypatch):
    own = empty_home / "own"
    own.mkdir()
    monkeypatch.setenv("TOKZOO_WEIGHTS", str(own))
    hub_file = empty_home / "torch" / "hub" / "checkpoints" / WEIGHTS["lpips_vgg"].filename
    hub_file.parent.mkdir(parents=True)
    hub_file.write_bytes(b"x")
    assert find_weights("lpips_vgg") == hub_file  # found in the hub cache when not in TOKZOO_WEIGHTS
    (own / WEIGHTS["lpips_vgg"].filename).write_bytes(b"x")
    ok, reason = weights_available("lpips_vgg")
    assert ok and str(own) in reason
    status = {r["name"]: r for r in weight_status()}
    assert status["lpips_vgg"]["present"] and status["lpips_vgg"]["path"].startswith(str(own))
    assert not status["inception_fid"]["present"]
    assert status["inception_fid"]["path"].startswith(str(own))  # downloads would go there


def test_unknown_weights_name_is_a_config_error():
    with pytest.raises(ConfigError, match="lpips_vgg"):
        weights_available("nope")


def test_download_offline_fails_fast_with_reason(empty_home, monkeypatch):
    calls = []

    def offline(url, dst, hash_prefix=None, progress=True):
        calls.append((url, dst, hash_prefix, socket.getdefaulttimeout()))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    before = socket.getdefaulttimeout()
    start = time.monotonic()
    result = download_weights()
    assert time.monotonic() - start < 2.0
    assert set(result) == set(WEIGHTS)
    for name, status in result.items():
        assert status.startswith("failed: ") and "name resolution" in status and WEIGHTS[name].url in status
    assert len(calls) == len(WEIGHTS)
    assert all(timeout is not None and timeout <= 60 for *_, timeout in calls)  # a short timeout was set
    assert socket.getdefaulttimeout() == before  # and restored
    assert download_weights(["nope"])["nope"].startswith("failed: unknown")


def test_download_writes_into_first_search_dir_and_skips_present(empty_home, monkeypatch):
    calls = []

    def fake(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        Path(dst).write_bytes(b"weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake)
    assert download_weights(["inception_fid"]) == {"inception_fid": "ok"}
    assert calls == [(WEIGHTS["inception_fid"].url, "6726825d")]
    assert weights_available("inception_fid")[0]
    assert download_weights(["inception_fid"]) == {"inception_fid": "ok"}
    assert len(calls) == 1  # already present: not fetched again


def test_hub_weights_exposes_tokzoo_dir_to_torch_hub_and_blocks_downloads(empty_home, monkeypatch):
    own = empty_home / "own"
    own.mkdir()
    monkeypatch.setenv("TOKZOO_WEIGHTS", str(own))
    spec = WEIGHTS["lpips_vgg"]
    torch.save({"w": torch.arange(3)}, own / spec.filename)
    hub_before = torch.hub.get_dir()
    with hub_weights("lpips_vgg"):
        # what torchvision does inside lpips / torchmetrics
        loaded = torch.hub.load_state_dict_from_url(spec.url, map_location="cpu")
        assert torch.equal(loaded["w"], torch.arange(3))
        with pytest.raises(TokzooError, match="refused to download"):
            torch.hub.load_state_dict_from_url("https://example.invalid/other-12345678.pth")
    assert torch.hub.get_dir() == hub_before
    assert torch.hub.download_url_to_file.__name__ == "download_url_to_file"
    with pytest.raises(TokzooError, match="not found"):
        with hub_weights("inception_fid"):
            pass


def test_exclude_from_checkpoint_drops_frozen_weights_and_still_loads_strictly():
    parent = nn.Module()
    parent.trainable = nn.Linear(2, 2)
    parent.frozen = exclude_from_checkpoint(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
    state = parent.state_dict()
    assert set(state) == {"trainable.weight", "trainable.bias"}
    frozen_before = parent.frozen[0].weight.detach().clone()
    state["trainable.weight"] = torch.ones(2, 2)
    parent.load_state_dict(state, strict=True)
    assert torch.equal(parent.trainable.weight, torch.ones(2, 2))
    assert torch.equal(parent.frozen[0].weight, frozen_before)
