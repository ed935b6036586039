"""A real run's step time beside `plan`'s estimate for the same setting.

`python -m jaxformer.bench plan --config RUN/config.yaml --topology T --measured RUN` plans the run's
own config (its setting is the plan's first candidate) and prints the median `step_seconds` its
metrics.jsonl logged next to the estimate for that setting, so a user learns how far the roofline
estimate is from their hardware before trusting its ranking of the other candidates.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from typing import Any, Optional


def logged_step_seconds(run_dir: str) -> tuple[float, int]:
    """(median step_seconds, rows used) of a run's logged training steps, the first row left out
    (its interval includes compiling)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as err:
        raise ValueError(f"--measured {run_dir}: cannot read {path} ({err.strerror})") from None
    seconds = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a killed run
        if row.get("split") == "train" and row.get("step_seconds"):
            seconds.append(float(row["step_seconds"]))
    seconds = seconds[1:] if len(seconds) > 1 else seconds
    if not seconds:
        raise ValueError(f"--measured {run_dir}: {path} logs no training step_seconds")
    return statistics.median(seconds), len(seconds)


def compare(
    rows: Sequence[dict[str, Any]], run_dir: str, logged: tuple[float, int], setting: Any
) -> dict[str, Any]:
    """The run's median step time (`logged_step_seconds`) and the plan's estimate for `setting`
    (a plan Candidate: the config's own, the run's when the plan was given the run's config)."""
    measured, count = logged
    row: Optional[dict[str, Any]] = next((r for r in rows if r["candidate"] == setting), None)
    estimate = row.get("step_seconds") if row else None
    return dict(
        run=run_dir,
        setting=setting.label(),
        measured_step_seconds=measured,
        logged_rows=count,
        estimated_step_seconds=estimate,
        measured_over_estimate=measured / estimate if estimate else None,
    )


def describe(m: dict[str, Any]) -> str:
    """One readable line."""
    head = (
        f"measured: {m['run']} logged a median step of {m['measured_step_seconds']:.3f} s "
        f"({m['logged_rows']} logged rows) for {m['setting']}"
    )
    if m["estimated_step_seconds"] is None:
        return head + "; the plan has no estimate for that setting (it did not compile or fit)"
    return (
        head + f"; estimated {m['estimated_step_seconds']:.3f} s: measured / estimate = "
        f"{m['measured_over_estimate']:.2f}"
    )
