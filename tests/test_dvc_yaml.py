"""dvc.yaml declares, for each stage, exactly what can change its outputs: the params its
module says it reads for them, and the project code it runs. Too little and DVC misses a
change (a stale result); too much and DVC reruns, or refuses its run-cache, for nothing."""

from __future__ import annotations

import ast

import pytest
from conftest import REPO_ROOT
from dvc_pipeline import resolved_stages

from stages import evaluate, preview, train
from transfer import stored_features
from transfer.strategies import STRATEGIES

#: Plumbing that cannot change what a stage writes (see the header of dvc.yaml).
PLUMBING = {"transfer/__init__.py", "transfer/errors.py", "transfer/atomic.py", "transfer/params.py",
            "transfer/schema.py", "transfer/stage.py",
            "transfer/record.py", "transfer/interrupts.py", "transfer/resume.py", "stages/__init__.py"}


def project_imports(module: str) -> set[str]:
    """The project files ``module`` (``stages.train``) runs: itself and what it imports from
    ``stages``/``transfer``, transitively (read from the source, not by importing it), but
    not through plumbing: what params.py imports to validate params.yaml, say, only decides
    whether a stage starts."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = f"{name.replace('.', '/')}.py"
        if path in seen or not (REPO_ROOT / path).is_file():
            continue
        seen.add(path)
        if path in PLUMBING:
            continue
        for node in ast.walk(ast.parse((REPO_ROOT / path).read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("stages", "transfer"):
                todo.append(node.module)
                todo.extend(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                todo.extend(a.name for a in node.names if a.name.split(".")[0] in ("stages", "transfer"))
    return seen - PLUMBING


def declared(stage: dict, kind: str) -> set[str]:
    return {entry if isinstance(entry, str) else next(iter(entry)) for entry in stage.get(kind) or []}


STAGES = resolved_stages(REPO_ROOT)
PARAMS = {
    "fetch": {"data.url", "data.sha256"},
    "unzip": {"seed", "data.val_fraction", "data.test_fraction", "data.train_per_class"},
    "weights": {"model.arch", "model.weights"},
    "features": set(stored_features.PARAMS),
    **{f"train@{name}": set(train.tracked_params(name)) for name in STRATEGIES},
    **{f"evaluate@{name}": set(evaluate.PARAMS) for name in STRATEGIES},
    "preview": set(preview.PARAMS),
    "compare": set(),
}


def test_every_stage_is_checked() -> None:
    assert set(STAGES) == set(PARAMS)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_params_are_what_the_stage_reads_for_its_outputs(name: str) -> None:
    """No runtime.* key anywhere: threads, workers, caches and network knobs change nothing."""
    assert declared(STAGES[name], "params") == PARAMS[name]


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_code_deps_are_the_code_the_stage_runs(name: str) -> None:
    stage = STAGES[name]
    module = stage["cmd"].split()[2]  # python -m stages.X ...
    code = {dep for dep in declared(stage, "deps") if dep.endswith(".py")}
    assert code == project_imports(module), name


def test_every_strategy_is_a_model_artifact() -> None:
    """Each strategy's checkpoint is declared as a DVC artifact of type model, its sidecar named,
    so that ``dvc artifacts get``, GTO and DVC Studio find it (tests/test_caching_e2e.py gets them)."""
    import yaml

    artifacts = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8"))["artifacts"]
    assert set(artifacts) == set(STRATEGIES)
    for name, artifact in artifacts.items():
        assert (artifact["path"], artifact["type"]) == (f"models/{name}.pt", "model")
        assert artifact["meta"]["sidecar"] == f"models/{name}.json"
        assert f"models/{name}.pt" in declared(STAGES[f"train@{name}"], "outs")


def test_no_module_imports_itself_around_a_loop() -> None:
    """The project's modules form layers: following imports (all of them, under TYPE_CHECKING
    too) from any module never leads back to it."""
    graph: dict[str, set[str]] = {}
    for path in sorted([*(REPO_ROOT / "stages").glob("*.py"), *(REPO_ROOT / "transfer").glob("*.py")]):
        name = f"{path.parent.name}.{path.stem}"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("stages", "transfer"):
                targets |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.split(".")[0] in ("stages", "transfer")}
        graph[name] = targets
    graph = {name: {t for t in targets if t in graph and t != name} for name, targets in graph.items()}

    def reaches(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo += graph[name]
        return seen

    assert [name for name in graph if name in reaches(name)] == []
