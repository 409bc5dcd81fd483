"""Stage ``weights``: whatever ``model.weights`` names (none, a local state_dict file, a
torchvision weights name) ends up as a checked plain state_dict in ``models/pretrained.pt``
that the train stage loads, or as one clear line saying what is wrong.

No test touches the internet: pretrained files are random state_dicts saved by the test,
torch's cache lives in ``tmp_path`` (``TORCH_HOME``), and name resolution of any host other
than the loopback fails, as it does on an offline machine.
"""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torchvision
from conftest import LoopbackServer, error_line, leftovers
from imagefolders import (
    make_image_folders,
    random_state_dict,
    run_training,
    save_state_dict,
    tiny_params,
)

import stages.train
import stages.weights
from transfer.checkpoints import CheckpointMeta, PretrainedMeta, read_meta
from transfer.download import sha256_of
from transfer.errors import UserError
from transfer.stage import run_stage

RESNET18_URL = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url


@pytest.fixture(scope="module")
def resnet_state() -> dict[str, torch.Tensor]:
    """Stands in for ImageNet weights: a random resnet18 state_dict (1000-class head)."""
    return random_state_dict("resnet18", seed=7)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every host name but the loopback fails to resolve, as on a machine without network."""
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host in ("127.0.0.1", "localhost", "::1"):
            return real(host, *args, **kwargs)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch cache; returns the folder torchvision files are cached in."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    assert checkpoints == tmp_path / "torch-home" / "hub" / "checkpoints"
    return checkpoints


def run_weights(tmp_path: Path, weights: str, **changes: Any) -> Path:
    """Run the stage in-process with ``model.weights: <weights>``; return its ``--out``. The
    architecture is the default, resnet18, whose torchvision weights names these tests use."""
    params = tiny_params(tmp_path / "params.yaml", {"model.arch": "resnet18", "model.weights": weights, **changes})
    out = tmp_path / "models" / "pretrained.pt"
    stages.weights.main(["--params", str(params), "--out", str(out)])
    return out


def weights_error(tmp_path: Path, weights: str, capsys: pytest.CaptureFixture[str], **changes: Any) -> str:
    """Run the stage as DVC does (exit code and stderr); return its one ``error:`` line."""
    params = tiny_params(tmp_path / "params.yaml", {"model.arch": "resnet18", "model.weights": weights, **changes})
    out = tmp_path / "models" / "pretrained.pt"
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_stage(stages.weights.main, ["--params", str(params), "--out", str(out)])
    assert info.value.code == 1
    assert not out.exists() and not out.with_suffix(".json").exists(), "a failed stage wrote its output"
    assert leftovers(out.parent) == []
    return error_line(capsys.readouterr().err)


def test_none_writes_an_empty_state(tmp_path: Path) -> None:
    """Random initialisation happens in the train stage, from ``seed``; nothing to store."""
    out = run_weights(tmp_path, "none")
    assert torch.load(out, weights_only=True) == {}
    meta = read_meta(out, PretrainedMeta)
    assert meta.arch == "resnet18" and meta.weights == "none" and not meta.pretrained
    assert meta.source.startswith("none") and meta.sha256 is None


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_file_reaches_the_trained_backbone(tmp_path: Path, suffix: str,
                                                 resnet_state: dict[str, torch.Tensor]) -> None:
    """A local state_dict is checked and copied to models/pretrained.pt, and the train stage
    starts from exactly those tensors (a frozen backbone keeps them, bit for bit)."""
    source = save_state_dict(resnet_state, tmp_path / "src" / f"my-weights{suffix}")
    out = run_weights(tmp_path, str(source))

    stored = torch.load(out, map_location="cpu", weights_only=True)
    assert stored.keys() == resnet_state.keys()
    assert all(torch.equal(stored[k], resnet_state[k]) for k in resnet_state)
    meta = read_meta(out, PretrainedMeta)
    assert (meta.arch, meta.weights, meta.source, meta.sha256) == ("resnet18", str(source), str(source),
                                                                   sha256_of(source))

    data = make_image_folders(tmp_path / "data", n_train=2, n_val=1)
    params = tmp_path / "params.yaml"
    run_training("feature_extract", params, data, out, tmp_path / "trained")
    trained = torch.load(tmp_path / "trained" / "feature_extract.pt", weights_only=True)
    backbone = [k for k in resnet_state if not k.startswith("fc.")]
    assert len(backbone) == 120
    for key in backbone:
        assert torch.equal(trained[key], resnet_state[key]), key
    assert trained["fc.weight"].shape == (2, 512)
    assert read_meta(tmp_path / "trained" / "feature_extract.pt", CheckpointMeta).weights_sha256 == sha256_of(source)


def test_weights_for_another_arch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Caught by the weights stage already (not later in training), listing the keys."""
    source = save_state_dict(random_state_dict("mobilenet_v3_small"), tmp_path / "mobilenet.pth")
    line = weights_error(tmp_path, str(source), capsys)
    assert line.startswith(f"error: weights file {source} does not match ResNet: ")
    assert "missing keys (bn1.bias," in line and "unexpected keys (classifier.0.bias," in line


def test_missing_weights_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A wrong path is one line naming it, not a traceback from torch.load."""
    line = weights_error(tmp_path, str(tmp_path / "nowhere.pth"), capsys)
    assert line == f"error: weights file {tmp_path / 'nowhere.pth'} does not exist"


def test_whole_model_pickle_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``torch.save(model)`` needs unpickling of arbitrary classes, which weights_only refuses."""
    source = tmp_path / "whole-model.pth"
    torch.save(torchvision.models.resnet18(weights=None), source)
    line = weights_error(tmp_path, str(source), capsys)
    assert line.startswith(f"error: weights file {source} holds pickled Python objects beyond tensors")


def test_unknown_weights_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A name that is neither a file nor torchvision's lists what would be accepted."""
    line = weights_error(tmp_path, "IMAGENET", capsys)
    assert "model.weights 'IMAGENET' is neither a weights name of resnet18 (DEFAULT, IMAGENET1K_V1)" in line


def test_damaged_cached_torchvision_weights(tmp_path: Path, torch_home: Path, offline: None,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A cached file whose sha256 does not start with the prefix in its name (a cut-off or
    replaced download) is refused rather than trained on, and the user is told what to do."""
    cached = torch_home / "resnet18-f37072fd.pth"
    save_state_dict(random_state_dict("resnet18"), cached)
    assert not sha256_of(cached).startswith("f37072fd")
    line = weights_error(tmp_path, "IMAGENET1K_V1", capsys)
    assert line.startswith(f"error: cached weights {cached} are damaged (sha256 ")
    assert "does not start with f37072fd" in line and line.endswith("delete the file and rerun")


@pytest.mark.parametrize("name", ["IMAGENET1K_V1", "DEFAULT"])
def test_offline_without_cache(tmp_path: Path, torch_home: Path, offline: None, name: str,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """One line: which URL could not be fetched, where the file is expected, how to get it."""
    line = weights_error(tmp_path, name, capsys, **{"runtime.download_retries": 0})
    assert line.startswith(f"error: could not download {RESNET18_URL}: cannot resolve host "
                           "'download.pytorch.org' (offline?)")
    assert f"download {RESNET18_URL} by hand into {torch_home}/" in line
    assert f"set model.weights in {tmp_path / 'params.yaml'} to a local .pth file" in line
    assert not torch_home.exists() or list(torch_home.iterdir()) == []


def test_torchvision_weights_name_reaches_the_network(tmp_path: Path, torch_home: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a cached file the stage asks for torchvision's URL and nothing else (the name
    resolution is intercepted before any packet leaves the machine)."""
    asked: list[str] = []

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        asked.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with pytest.raises(UserError, match="cannot resolve host"):
        run_weights(tmp_path, "IMAGENET1K_V1", **{"runtime.download_retries": 0})
    assert asked == ["download.pytorch.org"]


def serve_as_torchvision_weights(http_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch,
                                 body: bytes, digest_of: bytes | None = None) -> str:
    """Serve ``body`` on the loopback under a torchvision-style name, ``<arch>-<sha256[:8]>.pth``
    of ``digest_of`` (default: of ``body``), and make the stage's weights enum lookup return
    that URL. Everything else (cache path, download, prefix check, loading) is the real code."""
    prefix = hashlib.sha256(body if digest_of is None else digest_of).hexdigest()[:8]
    url = http_server.serve(f"mobilenet_v3_small-{prefix}.pth", body, content_type="application/octet-stream")
    monkeypatch.setattr(stages.weights, "torchvision_weights", lambda arch, name, source: SimpleNamespace(url=url))
    return url


def test_torchvision_weights_are_downloaded_once_into_torch_cache(
        tmp_path: Path, torch_home: Path, http_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first run downloads into ``torch.hub.get_dir()/checkpoints`` (where torchvision
    itself would put the file), later runs use that file without a request."""
    state = random_state_dict("mobilenet_v3_small", seed=3)
    body = save_state_dict(state, tmp_path / "served.pth").read_bytes()
    url = serve_as_torchvision_weights(http_server, monkeypatch, body)
    name = url.rsplit("/", 1)[1]
    arch = {"model.arch": "mobilenet_v3_small"}

    out = run_weights(tmp_path, "IMAGENET1K_V1", **arch)
    assert (torch_home / name).read_bytes() == body
    assert http_server.hits(name) == 1
    stored = torch.load(out, map_location="cpu", weights_only=True)
    assert all(torch.equal(stored[k], state[k]) for k in state) and stored.keys() == state.keys()
    meta = read_meta(out, PretrainedMeta)
    assert meta.source == url and meta.sha256 == hashlib.sha256(body).hexdigest()

    out.unlink()
    run_weights(tmp_path, "IMAGENET1K_V1", **arch)
    assert http_server.hits(name) == 1, "the cached file was downloaded again"
    assert out.is_file()


def test_download_that_does_not_match_its_name_is_not_kept(
        tmp_path: Path, torch_home: Path, http_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A download whose sha256 does not start with the prefix in its name (a wrong or
    tampered file) fails, and nothing lands in the cache to be trusted next time."""
    body = save_state_dict(random_state_dict("mobilenet_v3_small"), tmp_path / "served.pth").read_bytes()
    url = serve_as_torchvision_weights(http_server, monkeypatch, body, digest_of=b"another file")
    line = weights_error(tmp_path, "IMAGENET1K_V1", capsys, **{"model.arch": "mobilenet_v3_small"})
    assert line.startswith(f"error: {url}: sha256 {hashlib.sha256(body).hexdigest()} does not start with ")
    assert f"download {url} by hand into {torch_home}/" in line
    assert list(torch_home.iterdir()) == []


@pytest.mark.parametrize("kind", ["unknown user", "symlink loop", "name too long"])
def test_weights_path_that_cannot_be_opened(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    """``~nosuchuser/`` is no home folder (``expanduser`` leaves it as written, a path that does
    not exist), a link to itself never reaches a file, a name past the file system's 255 bytes
    cannot be looked up: each is one true line naming the path, not a traceback, nothing written."""
    loop = tmp_path / "loop.pt"
    loop.symlink_to(loop)
    weights, says = {
        "unknown user": ("~nosuchuser/w.pt", "weights file ~nosuchuser/w.pt does not exist"),
        "symlink loop": (str(loop), "Too many levels of symbolic links"),
        "name too long": (str(tmp_path / f"{'w' * 300}.pt"), "File name too long"),
    }[kind]
    line = weights_error(tmp_path, weights, capsys)
    assert weights in line and says in line, line
