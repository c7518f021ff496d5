"""The selection directory `select` writes (DESIGN §3): its selection.json (one per selection,
and the summary at the top of --out), the manifest inside each selection, and reading the picks
back. The one place that knows these files' names and fields."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("batctl.train")

SELECTION_JSON = "selection.json"
SAMPLES_TAR = "samples.tar"
"""The picks themselves, in webdataset layout, so train needs no pool."""


def read_chosen(selection: Path) -> list[dict[str, Any]]:
    """The picks of one selection directory, best first: one dict per pool row (rank, key,
    score, part, offset, row)."""
    return json.loads((selection / SELECTION_JSON).read_text(encoding="utf-8"))["chosen"]


def warn_other_adaptation(selection: Path, n_here: int, m_here: int) -> None:
    """Log a warning when training pairs `selection` with another number of adaptation samples
    than it was made for: γ = n / (n + m) is then not the γ its selection.json records.

    selection: one selection directory; n_here, m_here: the adaptation and pool samples train
    actually read."""
    path = selection / SELECTION_JSON
    if not path.is_file():  # a selection another tool wrote: nothing recorded to compare
        return
    recorded = json.loads(path.read_text(encoding="utf-8"))
    n, gamma = recorded.get("n_adaptation"), recorded.get("gamma")
    if not isinstance(n, int) or n == n_here:
        return
    actual = n_here / (n_here + m_here) if n_here + m_here else 1.0
    log.warning(
        "--selection %s was made for %d adaptation samples (gamma %s) but --data has %d: this "
        "run trains at gamma %.3g; select again with this --data for the gamma you asked for",
        selection, n, gamma, n_here, actual,
    )  # fmt: skip


def selection_payload(
    value: Any,
    plan: Any,
    source: Any,
    config: Any,
    fetch: Any,
    report: dict[str, Any] | None,
    auto_report: dict[str, Any] | None,
) -> dict[str, Any]:
    """selection.json of one selection directory."""
    from batctl.selection import cut_of

    count = value.count if value is not None else 0
    chosen = []
    for j, row in enumerate(plan.stream[:count].tolist()):
        part, offset, key = fetch.where(row)  # type: ignore[union-attr]
        chosen.append(
            {
                "rank": j + 1,
                "key": key,
                "score": float(plan.stream_scores[j]),
                "part": part,
                "offset": offset,
                "row": row,
            }
        )
    kind = value.kind if value is not None else None
    payload: dict[str, Any] = {
        "value": value.name if value is not None else None,
        "strategy": plan.strategy,
        "gamma": value.gamma if value is not None else 1.0,
        "gamma_definition": "n / (n + m): n = n_adaptation, m = count (pool samples added)",
        "gamma_requested": (
            value.requested if kind == "gamma" else "auto" if kind == "auto" else None
        ),
        "count": count,
        "threshold": value.requested if kind == "threshold" else None,
        "seed": config.seed,
        "dedupe": config.dedupe,
        "n_adaptation": plan.n,
        "eligible": plan.eligible,
        "cut": cut_of(plan, value) if value is not None else None,
        "scores": str(source.path),
        "pool": source.pool_paths() if fetch is not None else [],
        "chosen": chosen,
    }
    if report is not None:
        payload["prop2"] = report
    if auto_report is not None:
        payload["auto"] = auto_report
    return payload


def write_manifest(directory: Path, out: Any, name: str) -> None:
    """The manifest of one selection directory (written last inside it): the same fields and
    inputs as --out's, so `train --selection` follows it upstream to the model."""
    import socket

    from batctl import __version__
    from batctl.artifacts import MANIFEST, utcnow

    outputs = {
        p.relative_to(directory).as_posix(): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }
    manifest = {
        "stage": "select",
        "params": {**out.params, "value": name},
        "inputs": out.inputs,
        "version": __version__,
        "outputs": outputs,
        "started": out.started,
        "finished": utcnow(),
        "host": socket.gethostname(),
    }
    write_json(directory / MANIFEST, manifest)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    from batctl.metrics.report import jsonable  # strict JSON: NaN and infinities become null

    path.write_text(
        json.dumps(jsonable(payload), indent=2, sort_keys=False, allow_nan=False, default=str)
        + "\n",
        encoding="utf-8",
    )


def top_summary(
    plan: Any,
    source: Any,
    config: Any,
    reports: dict[str, Any],
    auto_report: dict[str, Any] | None,
) -> dict[str, Any]:
    """--out's selection.json: the store, the eligible pool, and one line per selection."""
    from batctl.selection import cut_of

    selections = {}
    for value in plan.values:
        entry: dict[str, Any] = {
            "gamma": value.gamma,
            "gamma_requested": value.requested if value.kind in ("gamma", "auto") else None,
            "count": value.count,
            "threshold": value.requested if value.kind == "threshold" else None,
            "cut": cut_of(plan, value),
        }
        if value.name in reports:
            report = reports[value.name]
            entry.update(holds=report["holds"], bat=report["bat"], adaptation=report["adaptation"])
        selections[value.name] = entry
    return {
        "scores": str(source.path),
        "complete_store": source.complete,
        **plan.summary(),
        "seed": config.seed,
        "dedupe": config.dedupe,
        "selections": selections,
        "auto": auto_report,
    }
