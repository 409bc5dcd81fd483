"""The ``device`` param: a device asked for by name that this machine lacks is an error with
a clear message (never a silent fallback to the CPU), a malformed name is rejected, and
``auto`` picks what exists.

These tests expect a machine without CUDA and MPS (the CI machine); where one is present the
"unavailable" cases cannot happen and are skipped.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import error_line
from imagefolders import tiny_params, train_argv

import stages.train
from transfer.devices import describe_device, resolve_device
from transfer.errors import UserError
from transfer.stage import run_stage

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
no_mps = pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")


@no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda(spec: str) -> None:
    """Asking for a GPU the machine lacks stops the run and says how to fix the params."""
    with pytest.raises(UserError) as info:
        resolve_device(spec)
    message = str(info.value)
    assert message.startswith(f"device {spec!r} was asked for, but CUDA is not available on this machine")
    assert "set device: auto or cpu in the params" in message


@no_mps
def test_mps_without_mps() -> None:
    """Same for Apple's MPS: no silent fallback to the CPU."""
    with pytest.raises(UserError, match=r"device 'mps' was asked for, but MPS is not available .*auto or cpu"):
        resolve_device("mps")


@pytest.mark.parametrize("spec", ["gpu", "GPU", "cuda:", "cuda:x", "cuda0", "cpu:0", " cpu", ""])
def test_malformed_devices(spec: str) -> None:
    """Names torch would reject later (or misread) are refused up front, listing the valid forms."""
    with pytest.raises(UserError, match=r"device must be auto, cpu, cuda, cuda:N or mps, got "):
        resolve_device(spec)


@no_cuda
@no_mps
def test_auto_is_the_cpu_here() -> None:
    """``auto`` falls back to the CPU when there is no accelerator, and says so in metrics."""
    device = resolve_device("auto")
    assert device == torch.device("cpu")
    assert describe_device(device) == "cpu"


def test_cpu_is_always_available() -> None:
    """The explicit CPU choice works on every machine."""
    assert resolve_device("cpu") == torch.device("cpu")


@no_cuda
def test_train_stage_stops_at_once_on_a_missing_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Through the stage: one ``error:`` line, exit 1, nothing written (no data is needed to
    see the device problem, so the user learns it before waiting for anything)."""
    params = tiny_params(tmp_path / "params.yaml", {"device": "cuda:3"})
    out = tmp_path / "out"
    argv = train_argv("finetune", params, tmp_path / "no-data", tmp_path / "no-weights.pt", out)
    with pytest.raises(SystemExit) as info:
        run_stage(stages.train.main, argv)
    assert info.value.code == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith("error: device 'cuda:3' was asked for, but CUDA is not available")
    assert not out.exists()


def test_errors_name_the_params_file_the_stage_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bad value found after loading (not by the schema) names the file given with
    ``--params``, not a params.yaml the stage never read."""
    params = tiny_params(tmp_path / "experiment.yaml", {"device": "gpu"})
    argv = train_argv("finetune", params, tmp_path / "no-data", tmp_path / "no-weights.pt", tmp_path / "out")
    with pytest.raises(SystemExit):
        run_stage(stages.train.main, argv)
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {params}: device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'")
