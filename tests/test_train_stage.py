"""Stage ``train@<mode>``, run in-process on tiny image folders: what each mode trains, what
stays bit-identical, what it writes, and that a seeded run is reproducible.

The "pretrained" weights are a random state_dict of the tests' small backbone
(:data:`imagefolders.TINY_ARCH`) with randomised BatchNorm
statistics, passed through the real weights stage, so "the backbone still holds the file's
tensors" cannot pass by accident with freshly initialised ones.
"""

from __future__ import annotations

import csv
import errno
import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import yaml
from conftest import REPO_ROOT, error_line, leftovers
from imagefolders import (
    TINY_ARCH,
    assert_same_run,
    checkpoint,
    load_trained,
    make_image_folders,
    random_state_dict,
    run_training,
    save_state_dict,
    tiny_params,
    train_argv,
)

import stages.train
import stages.weights
import transfer.params
from transfer.checkpoints import CheckpointMeta, PretrainedMeta, read_meta
from transfer.errors import UserError
from transfer.params import Params, TrainParams
from transfer.stage import run_stage
from transfer.strategies import STRATEGIES, FinetuneRecipe, Strategy

#: The tests' backbone (ShuffleNetV2 x0.5: a ResNet's ``fc`` head, 1.4 M parameters): its parameter
#: tensors, its head's input width, its BatchNorm layers, and its parameters with a 2-class head.
TENSORS, WIDTH, BATCHNORMS = 170, 1024, 56
PARAMS_2_CLASSES = 1_366_792 - WIDTH * 1000 - 1000 + WIDTH * 2 + 2


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 classes x (6 train + 4 val) 32x32 images: 3 training batches of 4."""
    return make_image_folders(tmp_path_factory.mktemp("data") / "hymenoptera_data")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """models/pretrained.pt written by the weights stage from a local .pth, and the tensors."""
    root = tmp_path_factory.mktemp("pretrained")
    state = random_state_dict(seed=11)
    source = save_state_dict(state, root / "imagenet-like.pth")
    params = tiny_params(root / "params.yaml", {"model.weights": str(source)})
    out = root / "models" / "pretrained.pt"
    stages.weights.main(["--params", str(params), "--out", str(out)])
    return out, state


class RecordingSGD(torch.optim.SGD):
    """torch's SGD, remembering the parameters each instance was given (and their values then),
    and at each step, each parameter group's lr and which of its parameters have a gradient."""

    made: ClassVar[list[list[torch.Tensor]]] = []
    initial: ClassVar[list[list[torch.Tensor]]] = []
    steps: ClassVar[list[list[tuple[float, list[bool]]]]] = []

    def __init__(self, params: Any, **kwargs: Any) -> None:
        groups = list(params)
        flat = [p for group in groups for p in (group["params"] if isinstance(group, dict) else [group])]
        RecordingSGD.made.append(flat)
        RecordingSGD.initial.append([p.detach().clone() for p in flat])
        super().__init__(groups, **kwargs)

    def step(self, *args: Any, **kwargs: Any) -> Any:
        RecordingSGD.steps.append([(group["lr"], [p.grad is not None for p in group["params"]])
                                   for group in self.param_groups])
        return super().step(*args, **kwargs)


@pytest.fixture
def sgd_spy(monkeypatch: pytest.MonkeyPatch) -> type[RecordingSGD]:
    """Spies on the SGD optimizers the stage builds (torch's SGD, doing its usual work)."""
    RecordingSGD.made, RecordingSGD.initial, RecordingSGD.steps = [], [], []
    monkeypatch.setattr(torch.optim, "SGD", RecordingSGD)
    return RecordingSGD


def train(tmp_path: Path, mode: str, data: Path, weights: Path, changes: dict[str, Any] | None = None,
          name: str = "out") -> Path:
    """Run ``train@<mode>`` (after the features stage for feature_extract); return the folder
    holding its outputs."""
    params = tiny_params(tmp_path / f"{name}.params.yaml", changes)
    return run_training(mode, params, data, weights, tmp_path / name)


def with_weights(weights: Path) -> dict[str, Any]:
    """The params that match ``weights`` (the train stage checks its sidecar against them)."""
    return {"model.weights": read_meta(weights, PretrainedMeta).weights}


def is_bn_buffer(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def test_feature_extract_trains_the_head_only(tmp_path: Path, data: Path, sgd_spy: type[RecordingSGD],
                                              pretrained: tuple[Path, dict[str, torch.Tensor]],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The optimizer gets the new head's weight and bias, nothing else; every backbone tensor
    (weights and, with ``batchnorm: frozen``, BatchNorm statistics) leaves training unchanged."""
    weights, state = pretrained
    out = train(tmp_path, "feature_extract", data, weights, with_weights(weights))

    (given,) = sgd_spy.made
    assert [tuple(p.shape) for p in given] == [(2, WIDTH), (2,)]
    assert f"{WIDTH * 2 + 2:,} trainable parameters" in capsys.readouterr().out

    trained = checkpoint(out, "feature_extract")
    backbone = [k for k in state if not k.startswith("fc.")]
    assert sum(is_bn_buffer(k) for k in backbone) == 3 * BATCHNORMS
    for key in backbone:
        assert torch.equal(trained[key], state[key]), key
    # The head did learn (so the equalities above are not those of a run that changed nothing).
    initial_weight, initial_bias = sgd_spy.initial[0]
    assert not torch.equal(trained["fc.weight"], initial_weight)
    assert not torch.equal(trained["fc.bias"], initial_bias)


def test_feature_extract_with_batchnorm_update(tmp_path: Path, data: Path,
                                               pretrained: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """``batchnorm: update`` is the tutorial's behaviour: the frozen weights stay, but the
    BatchNorm running statistics follow the new data."""
    weights, state = pretrained
    out = train(tmp_path, "feature_extract", data, weights,
                {**with_weights(weights), "train.feature_extract.batchnorm": "update"})
    trained = checkpoint(out, "feature_extract")
    for key in state:
        if key.startswith("fc."):
            continue
        if key.endswith("num_batches_tracked"):
            assert int(trained[key]) == int(state[key]) + 3, key  # 12 images, batches of 4
        elif is_bn_buffer(key):
            assert not torch.equal(trained[key], state[key]), key
        else:
            assert torch.equal(trained[key], state[key]), key


def test_finetune_trains_everything(tmp_path: Path, data: Path, sgd_spy: type[RecordingSGD],
                                    pretrained: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """Every parameter goes to the optimizer and moves: the counterpart of the freezing test,
    showing its bit-for-bit equalities are not true of any training run."""
    weights, state = pretrained
    out = train(tmp_path, "finetune", data, weights, with_weights(weights))
    (given,) = sgd_spy.made
    assert len(given) == TENSORS
    assert sum(p.numel() for p in given) == PARAMS_2_CLASSES
    assert all(p.requires_grad for p in given)
    trained = checkpoint(out, "finetune")
    assert not torch.equal(trained["conv1.0.weight"], state["conv1.0.weight"])
    assert not torch.equal(trained["conv5.1.running_mean"], state["conv5.1.running_mean"])


def test_outputs(tmp_path: Path, data: Path, pretrained: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """The checkpoint is a plain state_dict plus a sidecar that rebuilds the model; history
    has one row per epoch; the metrics agree with the history about the best epoch."""
    weights, _ = pretrained
    out = train(tmp_path, "finetune", data, weights, {**with_weights(weights), "train.finetune.epochs": 2})

    state = checkpoint(out, "finetune")
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    meta = read_meta(out / "finetune.pt", CheckpointMeta)
    assert meta.strategy == "finetune" and meta.arch == TINY_ARCH and meta.head == "fc"
    assert meta.classes == ["ants", "bees"]
    assert meta.preprocess.resize == 40 and meta.preprocess.crop == 32

    with (out / "finetune" / "history.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr"} <= set(rows[0])
    accs = [float(r["val_acc"]) for r in rows]
    best = accs.index(max(accs)) + 1

    metrics = json.loads((out / "finetune" / "train.json").read_text())
    assert metrics["epochs"] == 2 and metrics["best_epoch"] == best == meta.epoch
    assert metrics["best_val_acc"] == pytest.approx(max(accs), abs=1e-6) == meta.val_acc
    assert metrics["device"] == "cpu"

    model, loaded_meta = load_trained(out / "finetune.pt", torch.device("cpu"))
    assert loaded_meta == meta and not model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 2)


def test_history_is_on_disk_while_training_runs(tmp_path: Path, data: Path,
                                                pretrained: tuple[Path, dict[str, torch.Tensor]],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A user following ``dvc plots`` (or an editor's DVC integration) during a long run sees
    each finished epoch: when epoch ``e`` finishes its training phase (the scheduler's step),
    history.csv already holds epochs 1..e-1, as a whole CSV."""
    weights, _ = pretrained
    history = tmp_path / "out" / "finetune" / "history.csv"
    seen: list[tuple[int, list[int]]] = []
    step = torch.optim.lr_scheduler.StepLR.step

    def watching_step(self: torch.optim.lr_scheduler.StepLR, *args: Any) -> None:
        if self.last_epoch >= 1:  # not the step torch takes in the constructor, nor epoch 1's
            with history.open(newline="") as f:
                seen.append((self.last_epoch, [int(r["epoch"]) for r in csv.DictReader(f)]))
        step(self, *args)

    monkeypatch.setattr(torch.optim.lr_scheduler.StepLR, "step", watching_step)
    train(tmp_path, "finetune", data, weights, {**with_weights(weights), "train.finetune.epochs": 3})
    assert seen == [(1, [1]), (2, [1, 2])]


def test_three_classes_without_code_changes(tmp_path: Path) -> None:
    """The class count comes from the folders: a third class gives a 3-way head (both modes
    build it with the same ``replace_head``, so finetune alone is run)."""
    three = make_image_folders(tmp_path / "three", classes=("ants", "bees", "wasps"), n_train=4, n_val=2)
    params = tiny_params(tmp_path / "params.yaml")
    weights = tmp_path / "models" / "pretrained.pt"
    stages.weights.main(["--params", str(params), "--out", str(weights)])
    out = run_training("finetune", params, three, weights, tmp_path / "out")
    assert read_meta(out / "finetune.pt", CheckpointMeta).classes == ["ants", "bees", "wasps"]
    assert checkpoint(out, "finetune")["fc.weight"].shape == (3, WIDTH)
    model, _ = load_trained(out / "finetune.pt", torch.device("cpu"))
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    metrics = json.loads((out / "finetune" / "train.json").read_text())
    assert metrics["best_val_acc"] in {k / 6 for k in range(7)}  # 6 validation images


def test_seeded_runs_are_identical_with_any_worker_count(tmp_path: Path, data: Path) -> None:
    """Same seed, data and params: the same history, checkpoint bytes and sidecar, whether
    augmentations run in the main process or in 2 DataLoader workers (each image's crop and
    flip follow the seed, the epoch and the image, not the worker that makes it). Random
    initialisation (``model.weights: none``) makes the seed decide the starting weights too;
    two epochs make the second epoch's views and order count."""
    params = tiny_params(tmp_path / "params.yaml")
    weights = tmp_path / "models" / "pretrained.pt"
    stages.weights.main(["--params", str(params), "--out", str(weights)])
    runs = {workers: train(tmp_path, "finetune", data, weights,
                           {"runtime.num_workers": workers, "train.finetune.epochs": 2}, name=f"workers{workers}")
            for workers in (0, 2)}
    assert_same_run(runs[0], runs[2], "finetune")
    # The comparison can fail: another seed gives other weights.
    other = train(tmp_path, "finetune", data, weights, {"seed": 1, "train.finetune.epochs": 2}, name="other")
    with pytest.raises(AssertionError):
        assert_same_run(runs[0], other, "finetune")


def test_mixed_precision_and_deterministic_algorithms_on_cpu(tmp_path: Path, data: Path) -> None:
    """``train.amp`` runs the CPU in bfloat16 autocast (other numbers than float32, still finite),
    and ``train.deterministic`` turns on torch's deterministic algorithms without breaking a run."""
    params = tiny_params(tmp_path / "params.yaml")
    weights = tmp_path / "models" / "pretrained.pt"
    stages.weights.main(["--params", str(params), "--out", str(weights)])
    plain = train(tmp_path, "finetune", data, weights, name="fp32")
    try:
        amp = train(tmp_path, "finetune", data, weights, {"train.amp": True, "train.deterministic": True}, name="amp")
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    rows = {name: list(csv.DictReader((out / "finetune" / "history.csv").open())) for name, out in
            (("fp32", plain), ("amp", amp))}
    losses = {name: [float(r["train_loss"]) for r in rows[name]] for name in rows}
    assert all(torch.isfinite(torch.tensor(v)).all() for v in losses.values())
    assert losses["amp"] != losses["fp32"]


def test_weights_made_for_other_params_are_refused(tmp_path: Path, data: Path,
                                                    pretrained: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """models/pretrained.pt from an older weights run must not be trained on silently."""
    weights, _ = pretrained
    with pytest.raises(UserError, match=rf"holds {TINY_ARCH} weights '.*imagenet-like\.pth', not the params' "
                                        rf"{TINY_ARCH} 'none': run `dvc repro`"):
        train(tmp_path, "finetune", data, weights, {"model.weights": "none"})
    assert not (tmp_path / "out").exists()


def test_missing_pretrained_weights(tmp_path: Path, data: Path) -> None:
    """Running train before weights says which stage to run, not a FileNotFoundError."""
    with pytest.raises(UserError, match=r"pretrained\.pt does not exist: run the weights stage first"):
        train(tmp_path, "finetune", data, tmp_path / "models" / "pretrained.pt")


def test_not_an_image_folder(tmp_path: Path, pretrained: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """A data folder without val/ fails before any training, naming what was found."""
    weights, _ = pretrained
    empty = tmp_path / "data"
    (empty / "train" / "ants").mkdir(parents=True)
    with pytest.raises(UserError, match=r"is not an image-folder data set: no val/ split"):
        train(tmp_path, "finetune", empty, weights, with_weights(weights))


@pytest.mark.parametrize(("failure", "code", "said"), [
    (OSError(errno.ENOSPC, "No space left on device"), 1,
     "error: [Errno 28] No space left on device; the stage's outputs are as they were"),
    (KeyboardInterrupt(), 130, "interrupted by Ctrl-C (SIGINT): nothing was written to the stage's outputs"),
])
def test_a_run_stopped_after_its_checkpoint_leaves_the_outputs_as_they_were(
        failure: BaseException, code: int, said: str, tmp_path: Path, data: Path,
        pretrained: tuple[Path, dict[str, torch.Tensor]], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The stage writes the checkpoint, then its sidecar, then the run record. A rerun with
    another lr that fails (a full disk) or is interrupted writing the record, after it wrote the
    checkpoint, leaves the previous run's checkpoint, sidecar and record byte for byte and no
    temporary file, with one line and the exit status of its kind; the resume state stays."""
    weights, _ = pretrained
    out = train(tmp_path, "finetune", data, weights, with_weights(weights))
    outputs = [out / "finetune.pt", out / "finetune.json", out / "finetune" / "train.json"]
    before = [path.read_bytes() for path in outputs]
    written: list[Path] = []
    save_checkpoint = stages.train.save_checkpoint

    def recorded_save(path: Path, *args: Any) -> None:
        save_checkpoint(path, *args)
        written.append(path)

    def failing_write(path: Path, data: Any) -> None:
        raise failure

    monkeypatch.setattr(stages.train, "save_checkpoint", recorded_save)
    monkeypatch.setattr(stages.train, "write_json", failing_write)
    params = tiny_params(tmp_path / "again.params.yaml", {**with_weights(weights), "train.finetune.lr": 0.01})
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_stage(stages.train.main, train_argv("finetune", params, data, weights, out))
    assert info.value.code == code
    err = capsys.readouterr().err
    (line,) = [error_line(err)] if code == 1 else [line for line in err.splitlines() if line.strip()]
    assert line == said
    assert written == [out / "finetune.pt"], "the checkpoint was not written before the record"
    assert [path.read_bytes() for path in outputs] == before
    assert leftovers(out) == leftovers(out / "finetune") == []
    assert len(list((out / ".resume").iterdir())) == 1  # a rerun finishes from the saved state


def test_lp_ft_refuses_the_checkpoint_of_another_strategy(tmp_path: Path, data: Path,
                                                          pretrained: tuple[Path, dict[str, torch.Tensor]],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """lp_ft starts from feature_extract's classifier: given finetune's checkpoint (same arch,
    weights and classes), it says so in one line before training, and writes nothing."""
    weights, _ = pretrained
    out = train(tmp_path, "finetune", data, weights, with_weights(weights))
    params = tiny_params(tmp_path / "lp_ft.params.yaml", with_weights(weights))
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_stage(stages.train.main, train_argv("lp_ft", params, data, out / "finetune.pt", out))
    assert info.value.code == 1
    assert error_line(capsys.readouterr().err) == (
        f"error: {out / 'finetune.pt'} was trained by finetune, but this strategy starts from feature_extract's "
        "classifier: give --weights its checkpoint")
    assert not (out / "lp_ft.pt").exists() and not (out / "lp_ft").exists() and not (out / ".resume").exists()


# --------------------------------------------------------------------------- strategies


def test_warm_up_trains_the_head_alone_then_the_backbone_at_its_scale(
        tmp_path: Path, data: Path, sgd_spy: type[RecordingSGD],
        pretrained: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """``freeze_epochs: 1``, ``backbone_lr_scale: 0.1``: in epoch 1 only the head's parameters
    have gradients (the backbone's none); from epoch 2 all do. The head trains at ``lr`` and
    the backbone at a tenth of it, and the schedule scales both. The backbone's BatchNorm
    statistics stay the pretrained ones while it is frozen (eval mode)."""
    weights, _ = pretrained
    changes = {**with_weights(weights), "train.finetune.epochs": 3, "train.finetune.freeze_epochs": 1,
               "train.finetune.backbone_lr_scale": 0.1, "train.finetune.step_size": 2, "train.finetune.gamma": 0.5}
    train(tmp_path, "finetune", data, weights, changes)
    steps = sgd_spy.steps
    assert len(steps) == 9  # 3 epochs of 12 images in steps of 4
    for number, ((head_lr, head_grads), (backbone_lr, backbone_grads)) in enumerate(steps, start=1):
        epoch = (number - 1) // 3 + 1
        expected_lr = 0.001 * (0.5 if epoch == 3 else 1)
        assert head_lr == pytest.approx(expected_lr) and backbone_lr == pytest.approx(expected_lr * 0.1)
        assert head_grads == [True, True]  # fc.weight, fc.bias
        assert len(backbone_grads) == TENSORS - 2
        assert backbone_grads == [epoch > 1] * len(backbone_grads), f"epoch {epoch}"
    # The backbone did join: its parameters as the optimizer left them are not those it was
    # given (the checkpoint may hold epoch 1's, where it was frozen).
    (made,), (initial,) = sgd_spy.made, sgd_spy.initial
    assert not any(torch.equal(now, then) for now, then in zip(made[2:], initial[2:], strict=True))


def test_warm_up_keeps_the_backbone_as_it_was(tmp_path: Path, data: Path,
                                              pretrained: tuple[Path, dict[str, torch.Tensor]],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped after its warm-up epoch (by Ctrl-C in epoch 2's first step), the best-so-far
    state saved for resuming holds the pretrained backbone bit for bit, BatchNorm included."""
    weights, state = pretrained
    changes = {**with_weights(weights), "train.finetune.epochs": 2, "train.finetune.freeze_epochs": 1}
    original, calls = torch.optim.SGD.step, [0]

    def stop_in_epoch_two(self: torch.optim.SGD, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", stop_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, "finetune", data, weights, changes)
    (saved,) = (tmp_path / "out" / ".resume").iterdir()
    model = torch.load(saved, weights_only=True)["model"]
    for key, value in state.items():
        if not key.startswith("fc."):
            assert torch.equal(model[key], value), key


def test_lp_ft_starts_from_the_linear_probe_and_trains_everything(
        tmp_path: Path, data: Path, sgd_spy: type[RecordingSGD],
        pretrained: tuple[Path, dict[str, torch.Tensor]], capsys: pytest.CaptureFixture[str]) -> None:
    """``lp_ft`` starts from feature_extract's checkpoint: its trained head on the pretrained
    backbone, and fine-tunes every parameter from there."""
    weights, state = pretrained
    out = train(tmp_path, "lp_ft", data, weights, with_weights(weights))
    probe, (head_weight, head_bias, *backbone) = checkpoint(out, "feature_extract"), sgd_spy.initial[1]
    assert torch.equal(head_weight, probe["fc.weight"]) and torch.equal(head_bias, probe["fc.bias"])
    assert not torch.equal(probe["fc.weight"], sgd_spy.initial[0][0]), "the probe's head did train"
    assert len(backbone) == TENSORS - 2 and torch.equal(backbone[0], state["conv1.0.weight"])
    assert sum(p.numel() for p in sgd_spy.made[1]) == PARAMS_2_CLASSES
    lp_ft = checkpoint(out, "lp_ft")
    assert not torch.equal(lp_ft["conv1.0.weight"], state["conv1.0.weight"])
    assert read_meta(out / "lp_ft.pt", CheckpointMeta).strategy == "lp_ft"
    assert f"train@lp_ft: {TINY_ARCH} ({out / 'feature_extract.pt'})" in capsys.readouterr().out


def test_a_new_strategy_is_a_record_and_its_params(tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch,
                                                  pretrained: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """A strategy added to the table, with its recipe in the params' schema and its section in
    params.yaml, trains through the unchanged stage code; params.yaml must then hold its section."""
    weights, _ = pretrained

    class Train(TrainParams):
        slow_body: FinetuneRecipe

    class WithSlowBody(Params):
        train: Train

    monkeypatch.setitem(STRATEGIES, "slow_body", Strategy(inputs="images", start=None, trains="all"))
    monkeypatch.setattr(transfer.params, "Params", WithSlowBody)
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["train"]["finetune"]
    changes = {**with_weights(weights), "train.slow_body": {**raw, "epochs": 1, "backbone_lr_scale": 0.01}}
    out = train(tmp_path, "slow_body", data, weights, changes)
    assert read_meta(out / "slow_body.pt", CheckpointMeta).strategy == "slow_body"
    assert json.loads((out / "slow_body" / "train.json").read_text())["epochs"] == 1
    with pytest.raises(UserError, match=r"missing key train\.slow_body"):
        train(tmp_path, "slow_body", data, weights, with_weights(weights), name="without")
