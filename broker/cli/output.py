"""What the command line prints for scripts and people: JSON every parser reads, and the trials
table (`optuna-rq trials`: table, json or csv).

JSON has no NaN or infinity, and Python's `json` writes them as the bare words `NaN` and
`Infinity` that jq, JavaScript's JSON.parse and most parsers refuse. Every `--json` and
`--format json` output here writes them as the strings "NaN", "Infinity" and "-Infinity"
instead (`json_text`): a value stays a value (not confused with a missing one, as null would
be), and `float()` in Python (or `Number()` in JavaScript) reads each back.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
from datetime import datetime
from typing import TYPE_CHECKING, Any

from optuna_rq.protocol import RefusedTrial, TrialSummary
from optuna_rq.terminal.status_view import REFUSED

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["err_console", "json_text", "render_trials", "trial_row"]

_LAST_STEPS = 1
"""Intermediate values the table shows (the last reported); json and csv show them all."""


@functools.cache
def err_console() -> Console:
    """The console notes and errors go to (stderr), made when a command first writes one: rich
    is for the commands that print to a terminal, not for the command line's start."""
    from optuna_rq.terminal.study_bar import make_console

    return make_console(stderr=True)


def json_text(data: Any, *, indent: int | None = None) -> str:
    """`data` as strict JSON: a NaN or an infinity as the string "NaN", "Infinity" or
    "-Infinity" (see the module)."""
    return json.dumps(_finite(data), indent=indent, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        if math.isnan(value):
            return "NaN"
        return "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def trial_row(entry: TrialSummary | RefusedTrial) -> dict[str, Any]:
    """One trial as `trials --format json` prints it (a refused entry: its number, state
    `refused`, and why in `error`). Intermediate values by step (JSON keys are text); a
    multi-objective study's are lists, one value per objective."""
    if isinstance(entry, RefusedTrial):
        number: int | str = entry.number if entry.number is not None else entry.field
        return {"number": number, "state": REFUSED, "error": entry.why}
    return {
        "number": entry.number,
        "state": entry.state.value,
        "values": entry.values,
        "params": entry.params,
        "user_attrs": entry.user_attrs,
        "intermediate_values": {str(step): value for step, value in entry.intermediate_values},
        "datetime_start": _iso(entry.started_at),
        "datetime_complete": _iso(entry.ended_at),
        "duration_s": entry.duration_s,
        "fail_reason": entry.fail_reason,
        "error": entry.error,
        "attempt": entry.attempt,
        "retry_of": entry.retry_of,
        "truncated": entry.truncated,
    }


def _iso(epoch_s: float | None) -> str | None:
    """An instant as local time with its UTC offset (unambiguous on any machine)."""
    if epoch_s is None:
        return None
    return datetime.fromtimestamp(epoch_s).astimezone().isoformat(timespec="milliseconds")


def render_trials(rows: list[dict[str, Any]], output: str) -> str:
    """`rows` (`trial_row`) as `output`: json (a list of objects), csv (a column per value,
    parameter and user attribute, intermediate values as JSON text) or table."""
    if output == "json":
        return json_text(rows, indent=2) + "\n"
    params = sorted({p for row in rows for p in row.get("params", {})})
    attrs = sorted({a for row in rows for a in row.get("user_attrs", {})})
    width = max((len(row.get("values") or []) for row in rows), default=1) or 1
    value_cols = ["value"] if width == 1 else [f"value_{i}" for i in range(width)]
    attr_cols = [f"user_attrs.{a}" for a in attrs]
    if output == "csv":
        tail = ["intermediate_values", "datetime_start", "datetime_complete", "duration_s"]
        tail += ["fail_reason", "error", "attempt", "retry_of"]
        header = ["number", "state", *value_cols, *params, *attr_cols, *tail]
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        for row in rows:
            cells = _common(row, width, params, attrs)
            steps = row.get("intermediate_values")
            cells += [json_text(steps) if steps else None]
            cells += [row.get(name) for name in tail[1:]]
            writer.writerow(["" if v is None else _csv_cell(v) for v in cells])
        return out.getvalue()
    reports = any(row.get("intermediate_values") for row in rows)
    header = ["number", "state", *value_cols, *params, *attr_cols]
    header += [*(["last_report"] if reports else []), "duration_s", "fail_reason"]
    table = []
    for row in rows:
        cells = _common(row, width, params, attrs)
        if reports:
            cells.append(_last_report(row.get("intermediate_values") or {}))
        table.append([*cells, row.get("duration_s"), row.get("fail_reason")])
    lines = [header, *([_cell(v) for v in line] for line in table)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() + "\n"
        for line in lines
    )


def _common(row: dict[str, Any], width: int, params: list[str], attrs: list[str]) -> list[Any]:
    """The cells table and csv share: number, state, values, parameters, user attributes."""
    values = list(row.get("values") or [])
    values += [None] * (width - len(values))
    given, attributes = row.get("params", {}), row.get("user_attrs", {})
    return [
        row["number"],
        row["state"],
        *values,
        *(given.get(p) for p in params),
        *(attributes.get(a) for a in attrs),
    ]


def _last_report(steps: dict[str, Any]) -> str | None:
    if not steps:
        return None
    last = list(steps.items())[-_LAST_STEPS:]
    return ", ".join(f"{step}: {_short(value)}" for step, value in last)


def _short(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    return _cell(value)


def _csv_cell(value: Any) -> Any:
    if isinstance(value, (dict, list)):
        return json_text(value)
    return value


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json_text(value)
    return str(value)
