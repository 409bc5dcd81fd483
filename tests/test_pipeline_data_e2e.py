"""The data half of the pipeline through the real DVC CLI, in a throw-away git copy of the
project: ``dvc repro unzip`` fetches a tiny zip over loopback HTTP and extracts it; a second
repro does nothing (no second download); the fetch and data reports are DVC outputs in
``reports/`` (in DVC's cache, not in git, and not metrics)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from conftest import GIF_NAME, DvcRepo, LoopbackServer
from dvc_pipeline import cache_object, local_cache

from transfer.download import sha256_of


def test_repro_fetch_and_unzip(dvc_repo: DvcRepo, http_server: LoopbackServer, dataset_zip: Path) -> None:
    """Fetch + unzip produce the image folders and reports; a rerun is a no-op."""
    url = http_server.serve("hymenoptera_data.zip", dataset_zip.read_bytes())
    dvc_repo.set_params({"data.url": url, "data.sha256": None, "runtime.download_retries": 0})
    root = dvc_repo.root

    first = dvc_repo.dvc("repro", "unzip")
    assert "Running stage 'fetch'" in first.stdout and "Running stage 'unzip'" in first.stdout
    assert http_server.hits("hymenoptera_data.zip") == 1
    assert f"warning: skipped train/ants/{GIF_NAME}: unsupported file type" in first.stderr
    for split, count in (("train", 6), ("val", 4)):
        folder = root / "data" / "hymenoptera_data" / split
        assert sorted(p.name for p in folder.iterdir()) == ["ants", "bees"]
        for cls in ("ants", "bees"):
            assert len(list((folder / cls).glob("*.png"))) == count
    assert not (root / "data" / "hymenoptera_data" / "train" / "ants" / GIF_NAME).exists()
    data_report = json.loads((root / "reports" / "data.json").read_text())
    assert list(data_report["skipped"]) == [f"train/ants/{GIF_NAME}"]
    assert data_report["skipped_count"] == 1 and data_report["val"]["images"] == 8
    assert data_report["train"]["per_class"] == {"ants": 6, "bees": 6}
    fetch_report = json.loads((root / "reports" / "fetch.json").read_text())
    assert fetch_report["url"] == url and fetch_report["sha256"] == sha256_of(dataset_zip)
    assert fetch_report["sha256_pinned"] is False and fetch_report["bytes"] == dataset_zip.stat().st_size
    assert url in (root / "dvc.lock").read_text()

    # The reports are the stages' DVC-cached outputs: recorded in dvc.lock, in the cache, git-ignored.
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    for stage, report in (("fetch", "reports/fetch.json"), ("unzip", "reports/data.json")):
        (out,) = [o for o in lock[stage]["outs"] if o["path"] == report]
        assert cache_object(local_cache(dvc_repo), out["md5"]).read_bytes() == (root / report).read_bytes(), report
        assert dvc_repo.git("check-ignore", report).strip() == report

    second = dvc_repo.dvc("repro", "unzip")
    assert "Running stage" not in second.stdout
    assert "didn't change" in second.stdout or "Data and pipelines are up to date" in second.stdout
    assert http_server.hits("hymenoptera_data.zip") == 1, "an unchanged stage must not download again"

    status = dvc_repo.dvc("status", "unzip")
    assert "up to date" in status.stdout
    assert not (root / "metrics" / "data.json").exists() and not (root / "metrics" / "fetch.json").exists()


def test_repro_failed_download(dvc_repo: DvcRepo, http_server: LoopbackServer) -> None:
    """Through DVC, a 404 fails the run with the stage's one-line error and leaves no zip."""
    url = http_server.url("moved.zip")
    dvc_repo.set_params({"data.url": url, "runtime.download_retries": 0})
    proc = dvc_repo.dvc("repro", "unzip", check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert f"error: could not download {url}: server answered HTTP 404" in proc.stderr
    assert "by hand" in proc.stderr
    assert "Running stage 'unzip'" not in proc.stdout
    assert not (dvc_repo.root / "data" / "hymenoptera_data.zip").exists()
    assert not (dvc_repo.root / "data" / "hymenoptera_data").exists()
    assert [p.name for p in (dvc_repo.root / "data").iterdir()] == [".gitkeep"]
