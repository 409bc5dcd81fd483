"""Stage ``unzip``: the data set's zip, safely, into ``<out>/{train,val[,test]}/<class>/`` (see
:mod:`transfer.archive`), with a report of what it holds, what was left out and why, and
images found in two splits.
"""

from __future__ import annotations

from pathlib import Path

from transfer.archive import extract_image_folder
from transfer.atomic import atomic_dir, write_json
from transfer.errors import say
from transfer.imagefolder import SPLITS
from transfer.params import load_params
from transfer.stage import run_stage, stage_parser


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("archive", type=Path, help="the zip fetched by the fetch stage")
    parser.add_argument("--out", type=Path, default="data/hymenoptera_data")
    parser.add_argument("--report", type=Path, default="reports/data.json")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    per_class = params.data.train_per_class
    with atomic_dir(args.out) as tmp:
        report = extract_image_folder(args.archive, tmp, max_unpacked_mb=params.runtime.max_unpacked_mb,
                                      val_fraction=params.data.val_fraction,
                                      test_fraction=params.data.test_fraction, seed=params.seed,
                                      train_per_class=per_class)
        # Before the folder is swapped in: a report that cannot be written (a full disk)
        # then leaves the previous folder too, not a new folder beside an old report.
        write_json(args.report, report)

    if short := sorted(c for c, n in report["train"]["per_class"].items() if per_class != "all" and n < per_class):
        say(f"warning: data.train_per_class is {per_class}, but {', '.join(short)} has fewer training images: all of "
            "them are used")
    for name, reason in sorted(report["skipped"].items()):
        say(f"warning: skipped {name}: {reason}")
    for names in report["duplicates_across_splits"]:
        say(f"warning: the same image is in two splits, which makes scores optimistic: {', '.join(names)}")
    summary = ", ".join(f"{split} {report[split]['images']} images" for split in sorted(SPLITS) if split in report)
    print(f"extracted {args.out}: {summary} in {report['classes']} classes, {report['skipped_count']} skipped, "
          f"{report['ignored_entries']} hidden/other entries ignored"
          + (f", {report['left_out_of_train']} training images beyond data.train_per_class left out"
             if report["left_out_of_train"] else ""))


if __name__ == "__main__":
    run_stage(main)
