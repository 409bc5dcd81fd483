"""Resuming an interrupted training run after its last finished epoch (docs/troubleshooting.md).

After every epoch the train stage saves the run's whole state to
``<checkpoint's folder>/.resume/<strategy>-<key>.pt``. ``key`` digests everything that decides
the run, so a run resumes only from its own state; the data needs nothing saved, as its order
and augmentation follow the seed and the epoch. The file is none of the stage's DVC outputs
on purpose: DVC would delete it before a run, and a ``persist`` output would turn the
run-cache off. It holds only tensors and plain values (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import random
import sys
import types
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transfer.checkpoints import save_tensors
from transfer.download import sha256_of
from transfer.errors import one_line
from transfer.params import Params, json_digest
from transfer.training import EpochRecord, Progress

#: The folder, beside a stage's checkpoint, that holds the states of interrupted runs.
FOLDER = ".resume"
#: Bumped when what a state file holds changes, so an older file is not misread.
FORMAT = 4
#: The packages whose code decides what a run computes.
CODE = ("stages", "transfer")
#: The device types with a random generator of their own.
GENERATORS = ("cuda", "mps")


def tree_digests(root: Path) -> dict[str, str]:
    """SHA-256 of the file ``root``, or of every file under the folder ``root``, by relative
    path: what DVC would see change in an input (a second or two per GB)."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {file.relative_to(root).as_posix(): sha256_of(file) for file in files}


def code_digests(module: str) -> dict[str, str]:
    """The files of ``module`` (the stage) and of the project modules it imports, transitively
    (read from their globals: the modules and the functions and classes taken from them), not
    of stages it never loads: a run resumes only under the code that saved its state."""
    todo, files = [module], {}
    while todo:
        name = todo.pop()
        if name in files or name not in sys.modules:
            continue
        files[name] = Path(sys.modules[name].__file__ or "").resolve()
        for value in vars(sys.modules[name]).values():
            owner = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None)
            if isinstance(owner, str) and owner.split(".")[0] in CODE:
                todo.append(owner)
    project = Path(__file__).resolve().parents[1]
    return {str(path.relative_to(project)): sha256_of(path) for path in sorted(files.values())}


def run_key(strategy: str, params: Params, tracked: Iterable[str], inputs: Iterable[Path],
            device: torch.device, module: str) -> str:
    """A digest of what decides a run's results: the strategy, the params the stage declares
    (``tracked``), its inputs' bytes (by relative path, so the same data in another copy of
    the project gives the same key), the code, torch's version and the device type."""
    run = {
        "format": FORMAT, "strategy": strategy, "params": params.select(tracked),
        "inputs": [tree_digests(p) for p in inputs],
        "code": code_digests(module), "torch": torch.__version__, "device": device.type,
    }
    return json_digest(run)


# --------------------------------------------------------------------------- random generators

def rng_states(device: torch.device) -> dict[str, Any]:
    """The state of every random generator this process may draw from (loaders draw worker
    seeds from torch's, dropout from the device's): torch's, the device's, Python's, NumPy's
    (its key array as a list: ``weights_only`` loads no NumPy array)."""
    name, keys, *rest = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(), "python": random.getstate(), "numpy": [name, keys.tolist(), *rest],
    }
    if device.type in GENERATORS:  # this process's GPU only: another restart may see other GPUs
        states["device"] = torch.get_device_module(device).get_rng_state(device)
    return states


def set_rng_states(states: dict[str, Any], device: torch.device) -> None:
    """Put every generator back in the state :func:`rng_states` recorded, the device's on
    ``device`` (the GPU this process uses now, whatever its index was when saved; the run
    key holds the device type, so a state has one exactly where ``device`` has a generator)."""
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if device.type in GENERATORS:
        torch.get_device_module(device).set_rng_state(states["device"], device)


# --------------------------------------------------------------------------- the state file

#: What a run trains, by the name its state is saved under: the model, the optimizer and the
#: scheduler, saved and restored through their own ``state_dict`` and ``load_state_dict``.
Training = dict[str, Any]


@dataclass(frozen=True)
class ResumeState:
    """The state file of one run: ``folder/<strategy>-<key>.pt``."""

    folder: Path
    strategy: str
    key: str

    @property
    def path(self) -> Path:
        return self.folder / f"{self.strategy}-{self.key}.pt"

    def others(self) -> list[Path]:
        """States of this strategy saved by runs with other inputs, params or code."""
        return sorted(p for p in self.folder.glob(f"{self.strategy}-*.pt") if p != self.path)

    def save(self, training: Training, progress: Progress, rngs: list[dict[str, Any]]) -> None:
        """Write the state after ``progress.epoch``, with each process's random generators
        (``rngs``, by rank), atomically; then remove other runs' states of this strategy, so
        that at most one is kept."""
        state = {
            "format": FORMAT, "key": self.key, "strategy": self.strategy,
            **{name: part.state_dict() for name, part in training.items()},
            "progress": vars(progress) | {"history": [record.as_row() for record in progress.history]},
            "rng": rngs,
        }
        save_tensors(self.path, state, now=True)  # through memory: a full disk is then an OSError, said in one line
        for other in self.others():
            other.unlink(missing_ok=True)

    def load(self) -> dict[str, Any] | None:
        """The saved state of this run, or None where there is none. Raises ``ValueError``
        for a file that cannot be read or is not this run's (a torn copy, another format)."""
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file: any failure means "not usable"
            raise ValueError(one_line(exc, 200)) from None
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("key") != self.key:
            raise ValueError("it was not written by this version for this run")
        return state

    def remove(self) -> None:
        """Delete this strategy's states (stale once the outputs hold this run's results), and
        the folder once it is empty."""
        for path in [self.path, *self.others()]:
            path.unlink(missing_ok=True)
        if self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()


def restore(state: dict[str, Any], training: Training, device: torch.device, rank: int = 0) -> Progress:
    """Load a saved state into ``training`` and the random generators of process ``rank`` (the
    device's into ``device``); return the loop's progress to start from."""
    for name, part in training.items():
        part.load_state_dict(state[name])
    set_rng_states(state["rng"][rank], device)
    progress = state["progress"]
    return Progress(**progress | {"history": [EpochRecord(**row) for row in progress["history"]]})
