"""A run's name: one per run, unique within its experiment, the same in Prefect, MLflow, the registry and
`mixtune compare`. The scheduler makes a batch of flow runs at once and their UUIDv7 ids share their first
8 hex digits, so a name takes the id's end, which is random."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import Field

TAIL = 8  # hex digits of the id's random end: two runs due in the same second share them 1 time in 4 billion

# No leading dot (so never "." or ".."), no separator: the name is shown, never a path.
RunName = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$",
        max_length=100,
        description="This run's name in Prefect, MLflow, the registry and `mixtune compare` (kept, with the "
        "end of the run's id added if another run of the experiment has it). Empty: "
        "<run.name>-<due date>-<due time, UTC>-<end of the run's id>.",
    ),
]


def id_tail(flow_run_id: str, digits: int = TAIL) -> str:
    return str(flow_run_id).replace("-", "")[-digits:]


def generated_name(pipeline: str, due: datetime, flow_run_id: str) -> str:
    """`<pipeline>-<YYYYmmdd>-<HHMMSS>-<end of the id>`: when the run was due (its scheduled time, or when it was
    created), readable and sortable, and distinct for runs due in the same second."""
    return f"{pipeline}-{due.astimezone(UTC):%Y%m%d-%H%M%S}-{id_tail(flow_run_id)}"


def name_candidates(wanted: str, flow_run_id: str) -> list[str]:
    """`wanted`, then `wanted` with more of the id: the last, with the whole id, no other run can hold."""
    whole = id_tail(flow_run_id, 32)
    return [wanted, f"{wanted}-{id_tail(flow_run_id)}", f"{wanted}-{whole}"]
