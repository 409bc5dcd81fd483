"""Several processes training as one (:mod:`transfer.distributed`), on the CPU with gloo.

What must hold: each step's images are the single process's batch, split among processes;
the training loop on two processes computes what it computes on one (on a network without
BatchNorm or dropout, whose results depend on how a batch is split); the features stage
writes the same file from two machines' processes, meeting at a rendezvous, as from one, and
only process 0 writes or speaks;
settings this machine cannot run fail at start-up with one line. The train stage through
``dvc repro`` on two processes: tests/test_pipeline_train_e2e.py.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import REPO_ROOT, leftovers, stage_env, torchrun_here
from imagefolders import features_argv, make_image_folders, tiny_params, train_argv
from torch import nn
from torch.utils.data import Dataset

import stages.features
import stages.train
import stages.weights
from transfer import distributed
from transfer.datasets import EpochSampler
from transfer.distributed import IGNORE, World
from transfer.errors import UserError
from transfer.params import DistributedParams
from transfer.training import Progress, Steps, make_loader, train_model

CPU = torch.device("cpu")


def settings(**changes: object) -> DistributedParams:
    values = {"nproc_per_node": 2, "nnodes": 1, "backend": "auto", "rdzv_endpoint": None} | changes
    return DistributedParams(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [1, 2, 3, 5])
@pytest.mark.parametrize("items", [0, 1, 4, 9])
def test_shares_are_contiguous_and_cover_every_item_once(size: int, items: int) -> None:
    shares = [list(World(rank=r, size=size).share(range(items))) for r in range(size)]
    assert [i for share in shares for i in share] == list(range(items))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.parametrize("size", [1, 2, 3])
def test_each_step_is_the_single_process_batch_split_among_processes(size: int) -> None:
    """9 images in batches of 4: the last step has 1 image, so with 2 or 3 processes some get a
    stand-in (not real) and still take part in the step."""
    sampler = EpochSampler(9, seed=3, shuffle=True, cycle=None)
    sampler.set_epoch(2)
    single = [list(sampler)[start:start + 4] for start in range(0, 9, 4)]
    per_rank = [list(Steps(sampler, 4, World(rank=r, size=size))) for r in range(size)]
    assert {len(steps) for steps in per_rank} == {len(single)}  # every process takes every step
    for s, batch in enumerate(single):
        real = [pair for steps in per_rank for pair, is_real in steps[s] if is_real]
        assert real == batch
        assert all(steps[s] for steps in per_rank)
    stand_ins = sum(not is_real for steps in per_rank for step in steps for _, is_real in step)
    assert stand_ins == max(0, size - 1)


def test_torchrun_command_lines() -> None:
    one = distributed.torchrun_args(settings(), "stages.train", ["--strategy", "finetune"], "abc")
    assert one == ["--nnodes", "1", "--nproc-per-node", "2", "--standalone", "--max-restarts", "0",
                   "--module", "stages.train", "--strategy", "finetune"]
    nodes = distributed.torchrun_args(settings(nnodes=3, rdzv_endpoint="head:29400"), "stages.train", [], "abc")
    assert nodes[:4] == ["--nnodes", "3", "--nproc-per-node", "2"]
    assert nodes[4:10] == ["--rdzv-backend", "c10d", "--rdzv-endpoint", "head:29400", "--rdzv-id", "abc"]


@pytest.mark.parametrize(("changes", "sync", "message"), [
    ({"nnodes": 2}, None, "train.distributed.rdzv_endpoint must be host:port, reachable from every node, when "
                           "nnodes is 2, got null"),
    ({"backend": "nccl"}, None, "train.distributed.backend nccl needs CUDA; use gloo (or auto) on the CPU"),
    ({}, "train.lp_ft.sync_batchnorm", "train.lp_ft.sync_batchnorm needs CUDA: torch's SyncBatchNorm does not run "
                                       "on the CPU (set it to false)"),
])
def test_settings_this_machine_cannot_run_fail_at_start_up(changes: dict, sync: str | None, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message) + "$"):
        distributed.check(settings(**changes), CPU, "params.yaml", sync_batchnorm=sync)
    distributed.check(settings(nproc_per_node=1), CPU, "params.yaml", sync_batchnorm=sync)  # one process: no check


def test_a_stage_under_torchrun_must_be_asked_for_that_many_processes(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun around the stage by hand would train with a process count the params do not
    record (and DVC would not know of): the stage refuses before it reads anything."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    params = tiny_params(tmp_path / "params.yaml")
    with pytest.raises(UserError, match=r"^started as one of 2 processes, but train.distributed asks for 1: run "
                                        r"the stage without torchrun, it starts its own$"):
        stages.train.main(train_argv("finetune", params, tmp_path / "none", tmp_path / "none.pt", tmp_path))


# --------------------------------------------------------------------------- the loop on two processes

class Pixels(Dataset[tuple[torch.Tensor, int]]):
    """``(view, index)`` -> a fixed random image and its label (views are all the same)."""

    def __init__(self, count: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(count, 3, 8, 8, generator=generator)
        self.labels = torch.arange(count) % 3

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        return self.images[key[1]], int(self.labels[key[1]])


def train_small(world: World, epochs: int = 3) -> Progress:
    """A small network without BatchNorm or dropout, 9 training images in steps of 4 (the last
    of 1), 7 validation images; the same on any number of processes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    train, val = Pixels(9, seed=1), Pixels(7, seed=2)
    loaders = {
        "train": make_loader(train, EpochSampler(9, seed=5, shuffle=True, cycle=None), batch_size=4, workers=0,
                             device=CPU, world=world),
        "val": make_loader(val, EpochSampler(7, seed=5, shuffle=False, cycle=1), batch_size=2 * world.size,
                           workers=0, device=CPU, world=world),
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return train_model(model, loaders, nn.CrossEntropyLoss(reduction="sum"), optimizer, scheduler, epochs, CPU,
                       world=world)


def _process(rank: int, size: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size)
    try:
        result = train_small(World(rank=rank, size=size, local_rank=rank))
        torch.save({"state": result.best_state, "epoch": result.best_epoch,
                    "history": [r.as_row() for r in result.history]}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_the_loop_on_two_processes_computes_what_it_computes_on_one(tmp_path: Path) -> None:
    """Same global batches, so the same gradients, the same weights and the same history,
    to float rounding (sums over processes add in another order); every process holds the
    same model and numbers, which cover every image once."""
    single = train_small(World())
    # Forked, so that they start with what this process imported (a start-up of torch costs more
    # than their training); one thread each, so no OpenMP pool is used across the fork.
    mp.start_processes(_process, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    for rank in range(2):
        run = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert run["epoch"] == single.best_epoch
        for key, value in single.best_state.items():
            torch.testing.assert_close(run["state"][key], value, rtol=1e-5, atol=1e-6)
        for got, want in zip(run["history"], single.history, strict=True):
            assert got == pytest.approx(want.as_row(), rel=1e-5, abs=1e-6)
    assert any(row.train_acc not in (0, 1) for row in single.history)  # a run that learned something


def test_stand_in_places_count_for_nothing() -> None:
    assert nn.CrossEntropyLoss().ignore_index == IGNORE
    outputs = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    assert nn.CrossEntropyLoss(reduction="sum")(outputs, torch.tensor([0, IGNORE])).item() == pytest.approx(
        nn.CrossEntropyLoss(reduction="sum")(outputs[:1], torch.tensor([0])).item())


# --------------------------------------------------------------------------- the features stage

def test_an_error_in_the_processes_is_their_line_and_their_status(tmp_path: Path,
                                                                  capfd: pytest.CaptureFixture[str]) -> None:
    """Each process meets the same missing weights and says so in one line; torchrun's own
    report is not shown. (The processes are started from this one: a start-up costs more.)"""
    params = tiny_params(tmp_path / "params.yaml", {"train.distributed.nproc_per_node": 2})
    capfd.readouterr()
    with torchrun_here(), pytest.raises(SystemExit) as failed:
        stages.train.main(train_argv("feature_extract", params, tmp_path / "missing", tmp_path / "w.pt", tmp_path))
    assert failed.value.code == 1
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    expected = f"error: {tmp_path / 'w.pt'} does not exist: run the weights stage first (`dvc repro`)"
    assert set(lines) == {expected} and len(lines) <= 2, lines  # whole lines, never interleaved
    assert sorted(os.listdir(tmp_path)) == ["params.yaml"]  # no output, no temporary file


def test_two_nodes_meet_at_the_rendezvous_endpoint_and_one_writes_the_features_of_one(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Two "machines" of one process each, here on loopback: the features stage started on each
    (as a cluster's launcher would; one in a process of its own, one in this process), both
    with ``nnodes: 2`` and the same ``rdzv_endpoint``, each starting its process through
    torchrun. They compute as one: global process 0 alone speaks and writes (to its own copy
    of the output paths), the single process's bytes, and nothing is left behind. (Training on
    two processes: tests/test_resume.py and tests/test_pipeline_train_e2e.py.)"""
    data = make_image_folders(tmp_path / "data", n_train=3, n_val=3)  # 6 + 6 images, in steps of 4
    weights = tmp_path / "pretrained.pt"
    recipe = {"train.feature_extract.epochs": 3, "runtime.inference_batch_size": 4}
    one = tiny_params(tmp_path / "one.yaml", recipe)
    stages.weights.main(["--params", str(one), "--out", str(weights)])
    stages.features.main(features_argv(one, data, weights, tmp_path / "single"))  # here: a start-up costs more
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    nodes = tiny_params(tmp_path / "nodes.yaml", {**recipe, "train.distributed.nnodes": 2,
                                                  "train.distributed.rdzv_endpoint": f"127.0.0.1:{port}"})
    other = subprocess.Popen([sys.executable, "-m", "stages.features", *features_argv(nodes, data, weights,
                                                                                       tmp_path / "node1")],
                             cwd=REPO_ROOT, env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    capfd.readouterr()
    try:
        with torchrun_here():
            stages.features.main(features_argv(nodes, data, weights, tmp_path / "node0"))
        finished = [other.communicate(timeout=180), capfd.readouterr()]
    finally:
        other.kill()
    assert other.returncode == 0, finished
    assert [stderr for _, stderr in finished] == ["", ""], finished
    said = "".join(stdout for stdout, _ in finished)
    assert said.count("features: 3 view(s) of 6 train and 6 val images") == 1, said
    written = [node for node in (0, 1) if (tmp_path / f"node{node}").exists()]
    assert len(written) == 1, "one node, the one of global process 0, writes"
    out = tmp_path / f"node{written[0]}"
    assert leftovers(out) == []
    assert {p.name: p.read_bytes() for p in (out / "features").iterdir()} == {
        p.name: p.read_bytes() for p in (tmp_path / "single" / "features").iterdir()}
