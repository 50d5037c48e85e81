"""The import graph tells the pipeline's true story: layers point one way (entry points > flows > tasks >
core), and the flow's stages are siblings that share records and helpers only through shared modules."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mixtune", "flows", "tasks")
ENTRY_POINTS = {"mixtune.cli", "mixtune.compare"}
STAGES = {
    f"tasks.{name}"
    for name in (
        "ingest",
        "plan",
        "tokenize",
        "base_model",
        "rehearse",
        "distill",
        "data_report",
        "inputs",
        "mix",
        "train",
        "validate",
        "generation_check",
        "gate",
        "interpolate",
        "report",
        "champion",
    )
}
RANK = {"core": 0, "tasks": 1, "flows": 2, "entry": 3}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def imports(path: Path, known: set[str]) -> set[str]:
    """Every project module this file imports, at any depth (imports inside functions count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in known}


def layer(module: str) -> str:
    if module in ENTRY_POINTS:
        return "entry"
    if module.startswith(("flows.", "tasks.")) or module in ("flows", "tasks"):
        return module.split(".")[0]
    return "core"  # mixtune itself and mixtune.core


def bad_edges() -> list[str]:
    known = modules()
    bad = []
    for source, path in sorted(known.items()):
        for target in sorted(imports(path, set(known)) - {source}):
            if RANK[layer(target)] > RANK[layer(source)]:
                bad.append(f"{source} -> {target}: {layer(source)} imports {layer(target)}")
            elif target in STAGES and source.startswith("tasks."):
                kind = "a sibling stage" if source in STAGES else "a stage (shared modules sit below stages)"
                bad.append(f"{source} -> {target}: imports {kind}")
    return bad


def test_layers_point_one_way_and_stages_are_siblings():
    assert bad_edges() == []


def test_the_check_sees_real_imports():
    known = modules()
    assert {"tasks.train", "tasks.gate", "flows.finetune", "mixtune.cli", "mixtune.core.config"} <= set(known)
    assert "tasks.train" in imports(known["flows.finetune"], set(known))
    assert "tasks.records" in imports(known["tasks.train"], set(known))
    assert "flows.finetune" in imports(known["mixtune.cli"], set(known))  # inside a function


# --- the tracking seam (tasks/tracking) -----------------------------------------------------------------------
SEAM = "tasks.tracking"
SCANNED = (*PACKAGES, "benchmarks")
# Modules outside the seam allowed to import mlflow, each with the reason; a reason must be proven by a test.
MLFLOW_IMPORTERS: dict[str, str] = {}


def external_imports(path: Path) -> set[str]:
    """The top-level names of every module this file imports, at any depth."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def scanned_modules() -> dict[str, Path]:
    return {module_name(p): p for package in SCANNED for p in (ROOT / package).rglob("*.py")}


def in_seam(module: str) -> bool:
    return module == SEAM or module.startswith(f"{SEAM}.")


def mlflow_outside_the_seam() -> list[str]:
    return sorted(
        module
        for module, path in scanned_modules().items()
        if "mlflow" in external_imports(path) and not in_seam(module) and module not in MLFLOW_IMPORTERS
    )


def client_outside_the_seam() -> list[str]:
    """Uses of the seam's MlflowClient (`x.client`, `x._client`, `client_for`) outside it."""
    found = []
    for module, path in sorted(scanned_modules().items()):
        if in_seam(module):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            used = (isinstance(node, ast.Attribute) and node.attr in ("client", "_client", "client_for")) or (
                isinstance(node, ast.Name) and node.id == "client_for"
            )
            imported = isinstance(node, ast.ImportFrom) and any(a.name == "client_for" for a in node.names)
            if used or imported:
                found.append(f"{module}:{node.lineno}")
    return found


def test_only_the_seam_imports_mlflow():
    assert mlflow_outside_the_seam() == []


def test_only_the_seam_holds_the_mlflow_client():
    assert client_outside_the_seam() == []


def test_the_seam_is_free_of_prefect():
    seam = {m: p for m, p in scanned_modules().items() if in_seam(m)}
    assert len(seam) > 1 and "tasks.tracking.runs" in seam
    assert {m for m, p in seam.items() if "prefect" in external_imports(p)} == set()


def test_the_seam_checks_see_real_imports():
    known = scanned_modules()
    assert "mlflow" in external_imports(known["tasks.tracking.store"])
    assert "prefect" in external_imports(known["tasks.tracking_tasks"])
    assert not in_seam("tasks.tracking_tasks") and in_seam("tasks.tracking.parent")
    assert "benchmarks.forgetting" in known
