"""select: turn one score store into training sets at any γ, count or threshold (DESIGN §3, §5)."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from batctl.config import OutputOptions, flag_name
from batctl.errors import BatctlError
from batctl.fetch import Fetcher, write_tars
from batctl.previews import plot_scores, pool_samples, write_preview

log = logging.getLogger("batctl.select")


def parse_gammas(values: tuple[str, ...]) -> tuple[list[float], bool, list[str]]:
    """Comma-separated or repeated --gamma values -> (sorted floats, auto requested, problems)."""
    gammas: list[float] = []
    auto = False
    problems: list[str] = []
    for value in values:
        for item in (v.strip() for v in value.split(",")):
            if not item:
                continue
            if item == "auto":
                auto = True
                continue
            try:
                gamma = float(item)
            except ValueError:
                problems.append(f"--gamma: {item!r} is not a number or 'auto'")
                continue
            if not 0 < gamma < 1:
                problems.append(
                    f"--gamma: {item} is outside (0, 1); γ = n / (n + m) is D_A's share of the "
                    "augmented set (n adaptation samples, m pool samples added)"
                )
            else:
                gammas.append(gamma)
    return sorted(set(gammas)), auto, problems


@dataclass(frozen=True)
class SelectConfig(OutputOptions):
    """Select pool samples from a finished score store."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("scores", "out")
    UNSHARED: ClassVar[tuple[str, ...]] = ("out", "force", "batch_size", "seed")

    scores: str | None = None
    """Score directory (the output of `batctl score`), or its s3:// (gs://, az://) URL."""

    gamma: tuple[str, ...] = ()
    """γ = n / (n + m), D_A's share of the augmented set (n adaptation samples, m pool samples added; 0.75 with n = 30 adds m = 10): comma-separated or repeated, or auto (needs --model, --surrogate, --data)."""

    count: tuple[int, ...] = ()
    """Select exactly K pool samples."""

    threshold: tuple[float, ...] = ()
    """Select every sample with score >= η (in the store's units: a --normalize store holds scores per unit gradient norm); the resulting γ is reported."""

    strategy: Literal["albat", "random", "none"] = "albat"
    """albat: highest scores; random: uniform at random (seeded); none: empty (plain adaptation)."""

    seed: int = 0
    """Seed for --strategy random."""

    dedupe: bool = False
    """Also drop samples whose content hash repeats (keys are always deduplicated)."""

    allow_partial: bool = False
    """Select from a store whose chunks are not all done."""

    prop2: bool = False
    """Add the Proposition 2 report for every selection (loads the model: needs --model, --surrogate and --data)."""

    model: str | None = None
    """Backbone, for --prop2 and --gamma auto (unused otherwise)."""

    surrogate: Path | None = None
    """Surrogate adapter, for --prop2 and --gamma auto (unused otherwise)."""

    data: str | None = None
    """Adaptation set D_A, for --prop2 and --gamma auto (unused otherwise)."""

    damping: float | None = None
    """c in Proposition 2's λ = c · mean ||g||² / D_l; default: the score run's --damping."""

    batch_size: int = 8
    """Samples per gradient pass for the Proposition 2 report."""

    trust_remote_code: bool = False
    """Allow a hub model to run its own Python code (Proposition 2 loads the model)."""

    @property
    def loads_model(self) -> bool:
        """Whether this run computes Proposition 2 (--prop2 or --gamma auto): only then are
        --model, --surrogate and --data read."""
        return self.prop2 or parse_gammas(self.gamma)[1]

    def params(self) -> dict[str, Any]:
        """As recorded in the manifest, with the values in canonical form: `--gamma 0.75,0.5`,
        `--gamma 0.5 --gamma 0.75` and `--gamma .5,.75` are the same run (up to date). The
        Proposition 2 flags are left out when unused, so a pipeline TOML's shared `model` does
        not make a selection look out of date."""
        out = super().params()
        if not self.loads_model:
            for name in PROP2_FIELDS:
                out.pop(name, None)
        gammas, auto, _ = parse_gammas(self.gamma)
        out["gamma"] = [repr(g) for g in gammas] + (["auto"] if auto else [])
        out["count"] = sorted(set(self.count))
        out["threshold"] = sorted(set(self.threshold))
        return out

    def problems(self) -> list[str]:
        out = super().problems()
        _, auto, gamma_problems = parse_gammas(self.gamma)
        out += gamma_problems
        if self.strategy != "none" and not (self.gamma or self.count or self.threshold):
            out.append("give at least one --gamma, --count or --threshold")
        if any(k < 1 for k in self.count):
            out.append("--count values must be >= 1")
        if any(not math.isfinite(t) for t in self.threshold):
            out.append("--threshold values must be finite numbers")
        missing = [
            flag_name(name) for name in ("model", "surrogate", "data") if not getattr(self, name)
        ]
        if missing and (auto or self.prop2):
            asked = "--gamma auto" if auto else "--prop2"
            out.append(
                f"{asked} needs --model, --surrogate and --data; missing: {', '.join(missing)}"
            )
        if auto and self.strategy == "none":
            out.append("--gamma auto needs --strategy albat or random (none selects nothing)")
        if self.damping is not None and self.damping <= 0:
            out.append(f"--damping must be > 0, got {self.damping}")
        if self.batch_size < 1:
            out.append(f"--batch-size must be >= 1, got {self.batch_size}")
        return out


PROP2_FIELDS = ("model", "surrogate", "data", "damping", "batch_size", "trust_remote_code")
"""Select's flags that only Proposition 2 (--prop2, --gamma auto) reads."""
SELECTION_JSON = "selection.json"


def run(config: SelectConfig) -> dict[str, Any]:
    """Write one selection directory per γ/count/threshold (and gamma-auto) under `--out`.

    Returns a summary: n, eligible rows, and per selection its γ, count and, with a model, whether
    Proposition 2 holds.
    """
    from batctl import selection as sel
    from batctl.artifacts import check_same_model, describe_input, open_output, require_stage
    from batctl.remote import local_specs
    from batctl.samples import describe_data

    # setup: every input checked before anything is read or loaded
    gammas, auto, _ = parse_gammas(config.gamma)
    fp = config.strict_fingerprints
    source = sel.open_scores(config.scores, config.allow_partial)
    if not source.complete:
        progress = source.store.progress()
        log.warning(
            "selecting from an unfinished store: %d of %d chunks done; rows of the other chunks "
            "are not eligible",
            progress["done"],
            progress["total"],
        )
    inputs: dict[str, Any] = {"scores": describe_input(source.path, fp)}
    if not source.complete and isinstance(source.inputs.get("model"), dict):
        # An unfinished store has no manifest for `train` to follow upstream: record the model here.
        inputs["model"] = source.inputs["model"]
    pool_paths = local_specs(source.pool_paths()) if config.strategy != "none" else []
    if pool_paths:
        inputs["pool"] = describe_data(pool_paths, fp)
    surrogate = None
    if config.loads_model:
        from batctl.safeload import check_adapter_dir

        model = describe_input(config.model, fp)
        recorded = source.inputs.get("model")
        if isinstance(recorded, dict) and recorded.get("fingerprint") != model["fingerprint"]:
            raise BatctlError(
                f"--model {config.model}: the scores in {config.scores} were computed on "
                f"{recorded.get('path')}; pass that model"
            )
        surrogate = require_stage(config.surrogate, "surrogate", "--surrogate")
        check_same_model(surrogate, model, "--surrogate")
        check_adapter_dir(surrogate, "--surrogate")
        recorded_surrogate = source.inputs.get("surrogate")
        if (
            isinstance(recorded_surrogate, dict)
            and recorded_surrogate.get("fingerprint") != describe_input(surrogate)["fingerprint"]
        ):
            log.warning(
                "--surrogate %s is not the surrogate the scores were computed with (%s)",
                surrogate,
                recorded_surrogate.get("path"),
            )
        inputs.update(
            model=model, surrogate=describe_input(surrogate), data=describe_data(config.data, fp)
        )
    with open_output(
        config.out, stage="select", params=config.params(), inputs=inputs, force=config.force
    ) as out:
        # load
        columns = sel.read_columns(source.store)
        fetch = Fetcher(source, pool_paths) if pool_paths else None
        content = None
        if config.dedupe and fetch is not None:
            fetch.load_all_locations(columns.key)
            content = lambda row: sel.content_digest(fetch.raw_row(row).raw)  # noqa: E731
        # loop: the math, then Proposition 2, then one directory per value
        plan = sel.plan_selection(
            columns,
            source.n,
            strategy=config.strategy,
            gammas=gammas,
            counts=sorted(set(config.count)),
            thresholds=sorted(set(config.threshold)),
            auto=auto,
            seed=config.seed,
            content=content,
        )
        longest = max([v.count for v in plan.values] + [k for _, k in plan.auto_grid], default=0)
        if fetch is not None:
            fetch.locate(plan.stream[:longest], columns.key)
        for value in plan.values:
            if value.count == 0 and config.strategy != "none":
                log.warning(
                    "%s selects no pool samples (n = %d: m rounds to 0 or no score reaches it)",
                    value.name,
                    plan.n,
                )
        reports: dict[str, Any] = {}
        auto_report = None
        if config.loads_model:
            reports, auto_report = proposition2(config, source, plan, fetch, surrogate, auto)
        top_level = not plan.values  # --strategy none alone: --out is the (empty) selection
        write_tars(out.work, plan, fetch, top_level)
        summary = top_summary(plan, source, config, reports, auto_report)
        if top_level:
            payload = selection_payload(None, plan, source, config, fetch, None, None)
            write_preview(out.work, None, plan, fetch)
            _write_json(out.work / SELECTION_JSON, {**summary, **payload})
        for value in plan.values:
            directory = out.work / value.name
            payload = selection_payload(
                value,
                plan,
                source,
                config,
                fetch,
                reports.get(value.name),
                auto_report if value.kind == "auto" else None,
            )
            _write_json(directory / SELECTION_JSON, payload)
            write_preview(directory, value, plan, fetch)
            plot_scores(
                directory / "scores.png",
                columns,
                plan,
                [value],
                title=f"{value.name}: {value.count} of {plan.eligible} eligible ({plan.strategy})",
                chosen=plan.stream_scores[: value.count],
            )
            write_manifest(directory, out, value.name)
            log.info(
                "%s%s",
                gamma_summary(value, plan.n),
                ""
                if value.name not in reports
                else f"; Proposition 2 {'holds' if reports[value.name]['holds'] else 'does not hold'}",
            )
        # save
        if not top_level:
            _write_json(out.work / SELECTION_JSON, summary)
        plot_scores(
            out.work / "scores.png",
            columns,
            plan,
            plan.values,
            title=f"{plan.strategy}: {len(plan.values)} selection(s) from {source.path}",
        )
        result = {
            "out": str(config.out),
            "strategy": config.strategy,
            "n_adaptation": plan.n,
            "eligible": plan.eligible,
            "selections": {
                name: {
                    k: entry[k]
                    for k in ("gamma", "gamma_requested", "count", "holds")
                    if entry.get(k) is not None
                }
                for name, entry in summary["selections"].items()
            },
        }
        if plan.duplicate_keys or plan.duplicate_content:
            # eligible counts rows before dedupe: say how many of them were dropped
            result["duplicates_dropped"] = plan.duplicate_keys + plan.duplicate_content
        if auto_report is not None:
            result["auto_gamma"] = auto_report["gamma"]
        out.extra["summary"] = result
    return result


def gamma_summary(value: Any, n: int) -> str:
    """One selection in the γ = n / (n + m) notation, with the γ asked for when the γ achieved
    differs (m is a whole number of samples): `gamma-0.75: m = 2 pool samples added to n = 5,
    γ = 0.714 (asked 0.75)`."""
    text = f"{value.name}: m = {pool_samples(value.count)} added to n = {n}, γ = {value.gamma:.4g}"
    asked = value.requested if value.kind in ("gamma", "auto") else None
    if asked is not None and abs(float(asked) - value.gamma) > 5e-5:
        text += f" (asked {float(asked):.4g}; m is rounded to whole samples)"
    return text


# ------------------------------------------------------------------------------ Proposition 2


def proposition2(
    config: SelectConfig,
    source: Any,
    plan: Any,
    fetch: Fetcher | None,
    surrogate: Path | None,
    auto: bool,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Both sides of Proposition 2 for every value (and the --gamma auto grid, whose chosen γ
    is appended to plan.values as gamma-auto). Loads the model: torch is imported here."""
    from batctl import prop2
    from batctl.samples import load_samples
    from batctl.selection import GAMMA_GRID, Value
    from batctl.tasks import load_task
    from batctl.tasks.base import TaskSettings

    params = source.params
    c = config.damping if config.damping is not None else float(params.get("damping", 0.1))
    settings = TaskSettings(
        model=str(config.model),
        dtype=params.get("dtype", "fp32"),
        trust_remote_code=config.trust_remote_code,
        max_length=int(params.get("max_length", 512)),
        instance_prompt=params.get("instance_prompt"),
        resolution=params.get(
            "resolution"
        ),  # None: the model's native size, as the score run had it
        flip=bool(params.get("flip", False)),
        loss_draws=int(params.get("loss_draws", 4)),
    )
    adaptation = load_samples(
        config.data,
        flag="--data",
        strict=bool(params.get("strict", False)),
        paragraphs=bool(params.get("paragraphs", False)),
    )
    longest = max([v.count for v in plan.values] + [k for _, k in plan.auto_grid], default=0)
    rows = plan.stream[:longest]
    pool_samples = [fetch.decoded(int(r)) for r in rows] if fetch is not None else []
    log.info(
        "Proposition 2: gradients of %d adaptation and %d pool samples",
        len(adaptation),
        len(pool_samples),
    )
    task = load_task(settings, params.get("task", "auto"))
    task.load_adapter(surrogate, trainable=True)
    task.model.eval()
    grams = prop2.gradient_grams(task, adaptation, pool_samples, c, config.batch_size)
    if grams.n != plan.n:
        log.warning(
            "--data has %d finite adaptation samples, the score store %d: γ is computed with the "
            "store's n",
            grams.n,
            plan.n,
        )
    cache: dict[str, tuple[float, float]] = {}
    reports = {v.name: prop2.report(grams, v.count, cache) for v in plan.values}
    auto_report = None
    if auto:
        chosen, grid = prop2.choose_auto(grams, plan.auto_grid, cache)

        if chosen is None:
            log.warning(
                "--gamma auto: Proposition 2 holds at no γ of the grid %s..%s that the pool can "
                "serve; gamma-auto is the empty selection (plain adaptation)",
                GAMMA_GRID[0],
                GAMMA_GRID[-1],
            )
            value = Value("auto", None, 0, plan.n)
        else:
            log.info("--gamma auto: Proposition 2 holds from γ = %s (m = %d)", *chosen)
            value = Value("auto", chosen[0], chosen[1], plan.n)
        plan.values.append(value)
        reports[value.name] = prop2.report(grams, value.count, cache)
        auto_report = {
            "gamma": None if chosen is None else chosen[0],
            "count": value.count,
            "grid": grid,
            "grid_gammas": list(GAMMA_GRID),
            "holds_nowhere": chosen is None,
        }
    return reports, auto_report


# ------------------------------------------------------------------------------ outputs


def selection_payload(
    value: Any,
    plan: Any,
    source: Any,
    config: SelectConfig,
    fetch: Fetcher | None,
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
    _write_json(directory / MANIFEST, manifest)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    from batctl.metrics.report import jsonable  # strict JSON: NaN and infinities become null

    path.write_text(
        json.dumps(jsonable(payload), indent=2, sort_keys=False, allow_nan=False, default=str)
        + "\n",
        encoding="utf-8",
    )


def top_summary(
    plan: Any,
    source: Any,
    config: SelectConfig,
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
