"""MLflow tag names live in tasks/mlflow_names.py alone: a tag spelt inline elsewhere is one a rename would miss
and a search by tag would silently stop finding."""

import ast
import re
from pathlib import Path

from tasks.mlflow_names import FINAL, TASK, Metric, MlflowTag, Tag, val_loss

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("mixtune", "tasks", "flows", "benchmarks")
HOME = ROOT / "tasks" / "mlflow_names.py"
# "mixtune." strings that are no MLflow names
NOT_TAGS = {
    "mixtune.cli",  # the CLI module, run with `python -m`
    "mixtune.json",  # a delivered model folder's kind file (tasks/checkpoints.KIND_FILE)
}
# a tag as a key ("mixtune.x"), as a search's column ("tags.mixtune.x") or in a filter ("tags.`mixtune.x`")
INLINE_TAG = re.compile(r"(?:^|tags\.`?|`)mixtune\.[A-Za-z_]")
MAY_HOLD_A_TAG = re.compile(r"[\"'`.}]mixtune\.[A-Za-z_]")  # in the source text: after a quote, dot or brace


def literal_strings(tree: ast.AST) -> list[tuple[int, str]]:
    """Every string literal and f-string piece, docstrings left out: they may name a tag to explain it."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    strings = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]
    return [(node.lineno, node.value) for node in sorted(strings, key=lambda n: (n.lineno, n.col_offset))]


def inline_tags(source: str, name: str = "<source>") -> list[str]:
    if not MAY_HOLD_A_TAG.search(source):  # most files: no need to parse them, which keeps the test fast
        return []
    return [
        f"{name}:{line}: {text!r}"
        for line, text in literal_strings(ast.parse(source, name))
        if text not in NOT_TAGS and INLINE_TAG.search(text)
    ]


def test_no_tag_is_spelt_outside_the_names_module():
    found = []
    for package in SCANNED:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path != HOME:
                found += inline_tags(path.read_text(), str(path.relative_to(ROOT)))
    assert found == []


def test_the_check_finds_inline_tags():
    source = '''
"""A docstring may say mixtune.method."""
TAGS = {"mixtune.method": "lora"}
QUERY = f"tags.`mixtune.kind` = 'pipeline' and tags.`{x}` = '{y}'"
PIECE = f"{prefix}mixtune.stage"
COLUMN = "tags.mixtune.schedule"
FINE = ["mixtune.cli", "mixtune compare", "tags.mlflow.runName"]
'''
    assert [hit.split(": ", 1)[1] for hit in inline_tags(source)] == [
        "'mixtune.method'",
        "\"tags.`mixtune.kind` = 'pipeline' and tags.`\"",
        "'mixtune.stage'",
        "'tags.mixtune.schedule'",
    ]


def test_names_keep_their_namespaces():
    """The tags mixtune owns start with `mixtune.`, MLflow's with `mlflow.`; metrics carry neither."""
    assert all(tag.startswith("mixtune.") for tag in Tag)
    assert all(tag.startswith("mlflow.") for tag in MlflowTag)
    assert not [m for m in Metric if m.startswith(("mixtune.", "mlflow."))]
    assert f"tags.`{Tag.KIND}`" == "tags.`mixtune.kind`"  # a name formats as its string in a search


def test_the_names_are_the_ones_recorded_runs_carry():
    """Renaming one would orphan every run and dashboard that has it: a change here must be deliberate."""
    assert sorted(Tag) == [
        "mixtune.abandoned",
        "mixtune.artifact_path",
        "mixtune.challenger_domain",
        "mixtune.challenger_general",
        "mixtune.champion_version",
        "mixtune.decision",
        "mixtune.decision_reason",
        "mixtune.domain_val_digest",
        "mixtune.final_stage",
        "mixtune.flow_run_id",
        "mixtune.guard_actions",
        "mixtune.host",
        "mixtune.input_hash",
        "mixtune.interpolation_alpha",
        "mixtune.interpolation_reason",
        "mixtune.kind",
        "mixtune.last_skip_flow_run",
        "mixtune.lock",
        "mixtune.method",
        "mixtune.model_version",
        "mixtune.next_share",
        "mixtune.next_share_reason",
        "mixtune.prefect_flow_run_url",
        "mixtune.registered_model",
        "mixtune.resumed_from_flow_runs",
        "mixtune.run_folder",
        "mixtune.run_name",
        "mixtune.schedule",
        "mixtune.stage",
        "mixtune.stopped_reason",
        "mixtune.verdict",
        "mixtune.verdict_reason",
    ]
    assert {Metric.TOKENS_PER_SECOND, Metric.FINAL_DOMAIN_VAL_LOSS, Metric.GENERAL_DRIFT} == {
        "tokens_per_second",
        "final_domain_val_loss",
        "general_drift",
    }
    assert FINAL + val_loss("general") == "final_general_val_loss" and FINAL + TASK == "final_task/"
