"""select: turn one score store into training sets at any γ, count or threshold (DESIGN §3, §5)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from batctl.config import OutputOptions, flag_name
from batctl.errors import BatctlError
from batctl.fetch import Fetcher, write_tars
from batctl.previews import plot_scores, pool_samples, write_preview
from batctl.selection_files import (
    SELECTION_JSON,
    selection_payload,
    top_summary,
    write_json,
    write_manifest,
)

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


def run(config: SelectConfig) -> dict[str, Any]:
    """Write one selection directory per γ/count/threshold (and gamma-auto) under `--out`.

    Returns a summary: n, eligible rows, and per selection its γ, count and, with a model, whether
    Proposition 2 holds.
    """
    from batctl import selection as sel
    from batctl.artifacts import (
        check_same_model,
        describe_input,
        describe_model,
        open_output,
        require_stage,
    )
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

        model = describe_model(config.model, fp)
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
            from batctl.prop2 import selection_reports

            reports, auto_report = selection_reports(config, source, plan, fetch, surrogate, auto)
        top_level = not plan.values  # --strategy none alone: --out is the (empty) selection
        write_tars(out.work, plan, fetch, top_level)
        summary = top_summary(plan, source, config, reports, auto_report)
        if top_level:
            payload = selection_payload(None, plan, source, config, fetch, None, None)
            write_preview(out.work, None, plan, fetch)
            write_json(out.work / SELECTION_JSON, {**summary, **payload})
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
            write_json(directory / SELECTION_JSON, payload)
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
            write_json(out.work / SELECTION_JSON, summary)
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
