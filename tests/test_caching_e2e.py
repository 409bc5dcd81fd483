"""What DVC can skip, through the real CLI, on copies of the session's reproduced pipeline
(``dvc_pipeline.shared_pipeline``), of its queued sweep (``shared_experiments``: feature_extract
with two seeds and two sizes of ``data.train_per_class``) and of the README's plain
experiment (``plain_run``: feature_extract's learning rate changed):

- identical reruns: a stage writes the same bytes from the same inputs (data, features,
  checkpoints, plot data), so a forced rerun changes nothing but the run records (the stages
  not rerun here are rerun, and compared, by other tests: :data:`RERUN_STAGES`);
- no spurious reruns: rerunning the weights stage, or changing ``runtime.*`` (how fast a stage
  runs, not what it writes), leaves everything downstream up to date;
- a change to the head's recipe reruns the head only, not the backbone (the features stage);
- DVC's run-cache gives back earlier results instead of training again, locally and, pushed
  to a DVC remote, in another clone of the repository.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

from conftest import VENV_BIN, DvcRepo
from dvc_pipeline import (
    EXPERIMENT_LR,
    PIPELINE_PARAMS,
    Background,
    Experiments,
    Pipeline,
    background,
    beside_pipeline,
    cache_object,
    cached_stages,
    copy_repo,
    declared_outputs,
    declared_stages,
    dvc_json,
    head_lock,
    pipeline_env,
    plain_run,
    ran_stages,
    resolved_stages,
    run_cache_entries,
    run_in_background,
    workspace_lock,
)

#: What an experiment of the sweep ran (dvc_pipeline.SWEEP: feature_extract alone, with a seed),
#: and the params of one of them: seed 1, two images per class.
SWEPT = ["unzip", "features", "train@feature_extract", "evaluate@feature_extract"]
ONE_OF_THEM = {"seed": 1, "data.train_per_class": 2, "train.feature_extract.lr": EXPERIMENT_LR}
COMMITTED = {"seed": PIPELINE_PARAMS["seed"], "data.train_per_class": "all", "train.feature_extract.lr": 0.001}


FORCED_RERUN = "test_forced_rerun_writes_identical_outputs"
#: The stages the forced rerun runs again (each costs a start-up of torch). The others are run a
#: second time on the same inputs elsewhere, in another process, and their outputs compared byte
#: for byte: weights in test_rerun_weights_and_runtime_params_rerun_nothing, train@finetune (whose
#: code train@lp_ft runs from another start) in test_pipeline_train_e2e.py's Ctrl-C test,
#: evaluate@feature_extract in the colleague's clone of
#: test_run_cache_restores_earlier_results_here_and_through_a_remote, the features stage (from one
#: process and from two machines' processes) in tests/test_distributed.py, and preview (a picture
#: drawn twice) in tests/test_evaluate_stage.py.
RERUN_STAGES = ["fetch", "unzip", "train@feature_extract", "compare"]


@beside_pipeline(FORCED_RERUN, "after")
def start_forced_rerun(base: Path, pipeline: Pipeline) -> Background:
    """The slowest check here, a second run of :data:`RERUN_STAGES`, starts in the background on
    a copy of the shared pipeline as soon as it is built, and overlaps the tests that come before."""
    return run_in_background(copy_repo(pipeline.repo, base), ["repro", "--force", "--single-item", *RERUN_STAGES],
                             base)


def sets(params: dict[str, object]) -> list[str]:
    """``-S key=value`` arguments of ``dvc exp run``."""
    return [arg for key, value in params.items() for arg in ("-S", f"{key}={value}")]


def changed_files(repo: DvcRepo) -> set[str]:
    """Paths git sees as changed (staged or not) or untracked."""
    return {line[3:] for line in repo.git("status", "--porcelain").splitlines()}


def clone(source: DvcRepo, base: Path) -> DvcRepo:
    """``git clone`` of ``source`` into ``base/repo``: what a colleague gets, without DVC's cache."""
    subprocess.run(["git", "clone", "-q", str(source.root), str(base / "repo")], env=source.env,
                   check=True, capture_output=True)
    return DvcRepo(base / "repo", pipeline_env(base / "home", base / "dvc-site-cache"))


def add_remote(repo: DvcRepo, remote: Path) -> None:
    """A local-folder DVC remote as the default, committed so that clones have it too."""
    repo.dvc("remote", "add", "-d", "shared", str(remote))
    repo.git("commit", "-q", "-m", "a DVC remote", "--", ".dvc/config")


RERUN_WEIGHTS = "test_rerun_weights_and_runtime_params_rerun_nothing"


@beside_pipeline(RERUN_WEIGHTS, "after")
def start_weights_rerun(base: Path, pipeline: Pipeline) -> Background:
    return run_in_background(copy_repo(pipeline.repo, base), ["repro", "--force", "weights"], base)


def test_rerun_weights_and_runtime_params_rerun_nothing(pipeline: Pipeline, tmp_path: Path) -> None:
    """``dvc repro --force weights`` rewrites the same weights, so features, train and evaluate
    stay up to date; changing any ``runtime.*`` param (threads, workers, batch size for
    inference, image cache, download retries and timeout, unzip's size cap) reruns no stage."""
    rerun = background(RERUN_WEIGHTS) or start_weights_rerun(tmp_path, pipeline)
    repo, forced = rerun.repo, rerun.result()
    assert ran_stages(forced.stdout) == ["weights"], forced.stdout
    assert workspace_lock(repo) == head_lock(repo)
    assert changed_files(repo) == set()

    runtime = {"runtime.threads": 2, "runtime.num_workers": 2, "runtime.inference_batch_size": 3,
               "runtime.image_cache_mb": 1, "runtime.download_retries": 5, "runtime.download_timeout": 30,
               "runtime.max_unpacked_mb": 20480}
    repo.set_params(runtime)
    changed = dvc_json(repo, "params", "diff")["params.yaml"]
    assert sorted(changed) == sorted(runtime), changed
    # Nothing is out of date, after the weights' rerun or the runtime change: nothing runs.
    again = repo.dvc("repro")
    assert ran_stages(again.stdout) == [] and cached_stages(again.stdout) == [], "a stage declares a runtime.* param"
    assert "Data and pipelines are up to date" in again.stdout, again.stdout
    assert workspace_lock(repo) == head_lock(repo)


def test_head_only_change_leaves_the_backbone_alone(pipeline: Pipeline, tmp_path: Path) -> None:
    """A new ``train.feature_extract.lr`` makes train@feature_extract out of date, and then
    evaluate@feature_extract, and nothing else: the features stage (the backbone's outputs)
    stays up to date and the backbone does not run again."""
    repo = copy_repo(pipeline.repo, tmp_path)
    repo.set_params({"train.feature_extract.lr": EXPERIMENT_LR})
    # `dvc status` and `dvc repro --dry` compare each stage with its own inputs by hash:
    # evaluate@feature_extract's input is still the old checkpoint until train@feature_extract
    # has written a new one, so they name train@feature_extract alone.
    status = dvc_json(repo, "status")
    assert status == {"train@feature_extract": [
        {"changed deps": {"params.yaml": {"train.feature_extract": "modified"}}}]}, status
    dry = repo.dvc("repro", "--dry")
    assert ran_stages(dry.stdout) == ["train@feature_extract"], dry.stdout
    unchanged = set(declared_stages(repo.root)) - {"train@feature_extract"}
    assert set(re.findall(r"^Stage '([^']+)' didn't change, skipping", dry.stdout, re.M)) == unchanged, dry.stdout
    assert dvc_json(repo, "status") == status, "--dry changed something"

    # The plain experiment of the README ran such a change (dvc_pipeline.plain_run): every
    # output but those of train@feature_extract and evaluate@feature_extract is the first run's.
    first, plain = head_lock(pipeline.repo), workspace_lock(plain_run(tmp_path / "plain", pipeline).repo)
    assert plain["models/feature_extract.pt"] != first["models/feature_extract.pt"]
    for kind in declared_outputs(repo.root).values():
        for path, writer in kind.items():
            if writer not in ("train@feature_extract", "evaluate@feature_extract"):
                assert plain[path] == first[path], path


#: Stages whose outputs all live in DVC's cache, so a remote can hold whole runs of them;
#: evaluate and preview keep theirs in git (``cache: false``, never pushed) and rerun instead.
SHAREABLE = {"fetch", "unzip", "weights", "features", "train@finetune", "train@feature_extract", "train@lp_ft"}


def test_run_cache_restores_earlier_results_here_and_through_a_remote(experiments: Experiments,
                                                                      tmp_path: Path) -> None:
    """``dvc exp run -S`` of params that already ran (here one of the sweep's experiments, run
    in the queue's temporary copies) restores every stage it needs from the run-cache ("Stage
    '...' is cached - skipping run, checking out outputs"), with that run's outputs byte for
    byte, and runs nothing.

    Pushed to a local-folder DVC remote with the committed results (``dvc push --run-cache
    --all-branches``), a strategy's model is a DVC artifact that ``dvc artifacts get`` downloads
    by name from the repository's URL, and the results reach a colleague: a fresh ``git clone`` gets
    every output with ``dvc pull`` (``dvc status`` clean, ``dvc repro`` runs nothing), and its
    ``dvc exp run --pull -S`` of those params restores the data and the training without
    training (the remote holds every output of those runs), reruns only the evaluation (its
    files are git's, never pushed), and ends with the same files. Back here, going back to the
    committed params restores everything."""
    source = copy_repo(experiments.repo, tmp_path / "source")
    there = source.dvc("exp", "run", *sets(ONE_OF_THEM), "evaluate@feature_extract")
    assert ran_stages(there.stdout) == [], there.stdout
    assert cached_stages(there.stdout) == SWEPT, there.stdout
    name = experiments.named(ONE_OF_THEM)
    now, ran, outputs = workspace_lock(source), head_lock(source, experiments.rev(name)), declared_outputs(source.root)
    written = [path for kind in outputs.values() for path, writer in kind.items() if writer in SWEPT]
    assert len(written) >= 8, written
    for path in written:
        assert now[path] == ran[path], f"{path} is not what experiment {name} wrote"
    assert dvc_json(source, "status", "evaluate@feature_extract") == {}

    remote = tmp_path / "remote"
    add_remote(source, remote)
    source.dvc("push", "--run-cache", "--all-branches")  # the workspace's outputs, main's, and the run-cache
    stage_of = {stage["cmd"]: name for name, stage in resolved_stages(source.root).items()}
    shared = {stage_of[e["cmd"]]: e for e in run_cache_entries(remote)
              if all(now[out["path"]] == out["md5"] for out in e["outs"])}
    assert set(shared) == set(declared_stages(source.root)), sorted(shared)
    for stage in SHAREABLE:
        for out in shared[stage]["outs"]:
            assert cache_object(remote, out["md5"]).exists(), (stage, out["path"])

    # Each strategy's model is a DVC artifact (tests/test_dvc_yaml.py: declared alike), here
    # finetune's: registered as a version (`gto register`: a git tag), `dvc artifacts get` finds
    # it by name in the repository and downloads it from the remote, as DVC Studio does.
    got = tmp_path / "finetune.pt"
    subprocess.run([str(VENV_BIN / "gto"), "register", "finetune"], cwd=source.root, env=source.env, check=True,
                   capture_output=True)
    subprocess.run([sys.executable, "-m", "dvc", "artifacts", "get", str(source.root), "finetune", "-o", str(got)],
                   cwd=tmp_path, env=source.env, check=True, capture_output=True)
    assert hashlib.md5(got.read_bytes()).hexdigest() == head_lock(source)["models/finetune.pt"]

    colleague = clone(source, tmp_path / "clone")
    missing = dvc_json(colleague, "status")
    assert set(missing) == set(declared_stages(colleague.root)), missing  # outputs or inputs not there
    colleague.dvc("pull")
    rerun = colleague.dvc("repro")
    assert ran_stages(rerun.stdout) == [] and "Data and pipelines are up to date" in rerun.stdout, rerun.stdout
    assert workspace_lock(colleague) == head_lock(source)
    assert changed_files(colleague) == set()

    run = colleague.dvc("exp", "run", "--pull", *sets(ONE_OF_THEM), "evaluate@feature_extract", timeout=300)
    assert cached_stages(run.stdout) == SWEPT[:-1] and ran_stages(run.stdout) == SWEPT[-1:], run.stdout
    theirs = workspace_lock(colleague)
    for path, md5 in now.items():
        if not path.startswith("reports/"):  # run records hold timings
            assert theirs[path] == md5, path
    assert dvc_json(colleague, "status", "evaluate@feature_extract") == {}

    back = source.dvc("exp", "run", *sets(COMMITTED), "evaluate@feature_extract")
    assert ran_stages(back.stdout) == [], back.stdout
    assert cached_stages(back.stdout) == SWEPT, back.stdout
    assert workspace_lock(source) == head_lock(source), "the restored outputs are not the first run's"
    # params.yaml is rewritten by `-S` (same values); every result file is the committed one.
    assert changed_files(source) <= {"params.yaml"}, changed_files(source)
    assert dvc_json(source, "params", "diff") == {}


def test_forced_rerun_writes_identical_outputs(pipeline: Pipeline, tmp_path: Path) -> None:
    """A second run of the stages (``dvc repro --force``; :data:`RERUN_STAGES`, the others are
    rerun elsewhere) writes byte-identical data, a checkpoint, the comparison and plots
    (dvc.lock's md5s equal the committed first run's, git sees no changed metrics or plot
    file); only the run records in reports/ (timings) may differ."""
    rerun = background(FORCED_RERUN) or start_forced_rerun(tmp_path, pipeline)
    repo, forced = rerun.repo, rerun.result()
    assert sorted(ran_stages(forced.stdout)) == sorted(RERUN_STAGES), forced.stdout
    assert set(RERUN_STAGES) < set(declared_stages(repo.root))

    before, after = head_lock(repo), workspace_lock(repo)
    assert sorted(after) == sorted(before)
    differ = sorted(path for path in before if before[path] != after[path])
    assert all(path.startswith("reports/") for path in differ), differ
    rerun_writes = ["data/hymenoptera_data.zip", "data/hymenoptera_data", "reports/comparison.json",
                    "models/feature_extract.pt", "models/feature_extract.json", "plots/feature_extract/history.csv"]
    assert set(rerun_writes) <= set(before), "the outputs people compare are all in dvc.lock (and so equal above)"
    assert before["reports/comparison.json"] == after["reports/comparison.json"], "the pairs hold no timings"
    # The pictures too: git sees no change in any metrics or plot file, only dvc.lock (reports).
    assert changed_files(repo) <= {"dvc.lock"}, changed_files(repo)
    assert dvc_json(repo, "status") == {}
