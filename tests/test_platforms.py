"""What the GPU and Mac paths need, checked on the CPU: their logic runs here even where their
devices do not (the GPU check, ``benchmarks/gpu_check.py``, runs the rest on a GPU).

- MPS has no float64: the loops' running sums use float32 there;
- loader workers started by spawn (macOS; Linux only where asked) get picklable datasets;
- normalisation builds no tensor from Python lists per batch (a blocking host-to-device copy);
- ``runtime.num_workers: auto`` shares the machine's cores among its training processes;
- ``train.deterministic`` on CUDA refuses, up front, models torch has no deterministic
  backward for;
- a resume state holds the random generator of the GPU a process uses, and gives it back to
  the GPU the process uses when it resumes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO_ROOT
from imagefolders import make_image_folders
from torch import nn
from torch.utils.data import DataLoader

from transfer.datasets import EpochSampler, TrainImages, ValImages
from transfer.devices import accumulator_dtype, resolve_workers
from transfer.errors import ParamError
from transfer.imagefolder import image_folders
from transfer.preprocess import IMAGENET, ModelInput
from transfer.reproducibility import check_deterministic
from transfer.resume import rng_states, set_rng_states

CPU = torch.device("cpu")


@pytest.mark.parametrize(("device", "dtype"), [("cpu", torch.float64), ("cuda", torch.float64),
                                               ("mps", torch.float32)])
def test_running_sums_avoid_float64_on_mps(device: str, dtype: torch.dtype) -> None:
    assert accumulator_dtype(torch.device(device)) == dtype


def test_workers_started_by_spawn_load_what_the_main_process_loads(tmp_path: Path) -> None:
    """macOS (and Linux from Python 3.14, where the loaders do not ask for fork) start loader
    workers by spawn, which pickles the data sets: they must pickle (no lambdas) and the
    workers, which decode the images themselves, must give the same batches."""
    split = image_folders(make_image_folders(tmp_path / "data", n_train=3, n_val=2, size=40))
    pre = IMAGENET.model_copy(update={"resize": 40, "crop": 32})
    for dataset in (TrainImages(split["train"], pre, seed=3, cache_bytes=10**8),
                    ValImages(split["val"], pre, cache_bytes=10**8)):
        dataset.images.fill("test")
        sampler = EpochSampler(len(dataset), seed=3, shuffle=True, cycle=None)
        sampler.set_epoch(2)
        here = list(DataLoader(dataset, batch_size=2, sampler=sampler))
        spawned = list(DataLoader(dataset, batch_size=2, sampler=sampler, num_workers=1,
                                  multiprocessing_context="spawn"))
        assert len(here) == len(spawned) > 0
        for (pixels, labels), (pixels_w, labels_w) in zip(here, spawned, strict=True):
            assert torch.equal(pixels, pixels_w) and torch.equal(labels, labels_w)


def test_normalisation_builds_no_tensor_per_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mean and std are made once, on the device; a batch costs no host-to-device copy of them."""
    prepare = ModelInput(IMAGENET, CPU)
    batch = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    expected = prepare(batch)

    def no_tensor(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise AssertionError("a tensor built from Python values per batch")

    monkeypatch.setattr(torch, "tensor", no_tensor)
    for _ in range(3):
        assert torch.equal(prepare(batch), expected)


@pytest.mark.parametrize(("processes", "workers"), [(1, 8), (2, 7), (8, 1), (16, 1)])
def test_auto_workers_share_the_cores_among_processes(processes: int, workers: int,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """16 cores: one process gets 8 workers (the cap), 2 get 7 each, 8 or 16 get one each,
    never 8 times the cores."""
    monkeypatch.setattr("transfer.devices.available_cores", lambda: 16)
    assert resolve_workers("auto", torch.device("cuda"), processes) == workers
    assert resolve_workers("auto", CPU, processes) == 0
    assert resolve_workers(3, torch.device("cuda"), processes) == 3


class Scatter(nn.Module):
    """A layer whose forward uses ``Tensor.put_``, which has no deterministic kernel even on
    the CPU: it stands for VGG's pooling to 7x7, which has none on CUDA."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + x.new_zeros(x.shape).put_(torch.tensor([0, 0]), torch.ones(2))


@pytest.fixture
def deterministic() -> Iterator[None]:
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


def test_deterministic_training_refuses_what_torch_cannot_run_deterministically(deterministic: None) -> None:
    """train.deterministic asks torch itself, with one forward and backward pass in its
    deterministic mode: a model with an operation torch cannot run deterministically on this
    device is refused with one line before training; one without trains; the pass leaves no
    gradient and no BatchNorm statistic changed behind it."""
    scatter = nn.Sequential(nn.Conv2d(3, 4, 3), Scatter(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ParamError, match=r"^p.yaml: train.deterministic is true, but torch has no deterministic cpu "
                                         r"kernel for this model \(put_ does not have a deterministic implementation"
                                         r"\): set it to false"):
        check_deterministic(scatter, CPU, True, 16, "p.yaml")
    check_deterministic(scatter, CPU, False, 16, "p.yaml")  # not asked for: nothing is run
    resnet_like = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                nn.Linear(4, 2)).train()
    before = {k: v.clone() for k, v in resnet_like.state_dict().items()}
    check_deterministic(resnet_like, CPU, True, 16, "p.yaml")
    assert resnet_like.training and all(p.grad is None for p in resnet_like.parameters())
    assert all(torch.equal(before[k], v) for k, v in resnet_like.state_dict().items())


def test_resume_keeps_the_generator_of_the_gpu_the_process_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process on cuda:1 saves cuda:1's generator only (not every visible GPU's, which fails
    on a restart that sees fewer), and a resumed process gives it to its own GPU, whatever its
    index is now. CUDA's generator functions stand in for the GPU here."""
    calls: list[tuple[str, Any]] = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or torch.ones(3))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(("set", device)))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every GPU's state saved"))
    states = rng_states(torch.device("cuda", 1))
    assert calls == [("get", torch.device("cuda", 1))] and torch.equal(states["device"], torch.ones(3))
    set_rng_states(states, torch.device("cuda", 0))
    assert calls[1:] == [("set", torch.device("cuda", 0))]


def test_the_gpu_check_runs_on_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/gpu_check.py's smoke mode runs every code path of the GPU check that a CPU can
    (both strategies, amp off and on), so the script works the day a GPU machine is at hand,
    and says which checks need a GPU."""
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import gpu_check

    gpu_check.main(["--smoke", "--out", str(tmp_path / "results.json")])
    results = json.loads((tmp_path / "results.json").read_text())
    for amp in ("amp=False", "amp=True"):
        assert set(results[amp]) == {"features", "finetune", "feature_extract"}
        assert results[amp]["finetune"]["train_images_per_second"] > 0
        assert results[amp]["features"]["images_per_second"] > 0
    if not torch.cuda.is_available():  # the GPU's own checks say that they need one
        assert results["sync_debug"] == {"skipped": "no CUDA"}
        assert results["contexts"] == {"skipped": "0 GPU(s): another GPU is needed to see a stray context"}
