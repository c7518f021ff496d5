"""select: turn one score store into training sets at any γ, count or threshold (DESIGN §3, §5)."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from batctl.config import OutputOptions
from batctl.errors import BatctlError

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
                    f"--gamma: {item} is outside (0, 1); γ = n/k is D_A's share of the augmented set"
                )
            else:
                gammas.append(gamma)
    return sorted(set(gammas)), auto, problems


@dataclass(frozen=True)
class SelectConfig(OutputOptions):
    """Select pool samples from a finished score store."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("scores", "out")

    scores: str | None = None
    """Score directory (the output of `batctl score`), or its s3:// (gs://, az://) URL."""

    gamma: tuple[str, ...] = ()
    """γ = n/k, D_A's share of the augmented set: comma-separated or repeated, or auto (needs --model)."""

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

    model: str | None = None
    """Backbone, for the Proposition 2 report and --gamma auto."""

    surrogate: Path | None = None
    """Surrogate adapter, for the Proposition 2 report and --gamma auto."""

    data: str | None = None
    """Adaptation set, for the Proposition 2 report and --gamma auto."""

    damping: float | None = None
    """c in Proposition 2's λ = c · mean ||g||² / D_l; default: the score run's --damping."""

    batch_size: int = 8
    """Samples per gradient pass for the Proposition 2 report."""

    trust_remote_code: bool = False
    """Allow a hub model to run its own Python code (Proposition 2 loads the model)."""

    def params(self) -> dict[str, Any]:
        """As recorded in the manifest, with the values in canonical form: `--gamma 0.75,0.5`,
        `--gamma 0.5 --gamma 0.75` and `--gamma .5,.75` are the same run (up to date)."""
        out = super().params()
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
        if auto and not (self.model and self.surrogate and self.data):
            out.append("--gamma auto needs --model, --surrogate and --data")
        elif any((self.model, self.surrogate, self.data)) and not all(
            (self.model, self.surrogate, self.data)
        ):
            out.append("the Proposition 2 report needs all of --model, --surrogate and --data")
        if auto and self.strategy == "none":
            out.append("--gamma auto needs --strategy albat or random (none selects nothing)")
        if self.damping is not None and self.damping <= 0:
            out.append(f"--damping must be > 0, got {self.damping}")
        if self.batch_size < 1:
            out.append(f"--batch-size must be >= 1, got {self.batch_size}")
        return out


SAMPLES_TAR = "samples.tar"
SELECTION_JSON = "selection.json"
PREVIEW_TEXTS = 100
"""preview.md shows the first this many chosen texts."""
SHEET_IMAGES = 64
"""contact_sheet.png shows the first this many chosen images."""
THUMB = 128


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
    if config.model is not None:
        model = describe_input(config.model, fp)
        recorded = source.inputs.get("model")
        if isinstance(recorded, dict) and recorded.get("fingerprint") != model["fingerprint"]:
            raise BatctlError(
                f"--model {config.model}: the scores in {config.scores} were computed on "
                f"{recorded.get('path')}; pass that model"
            )
        surrogate = require_stage(config.surrogate, "surrogate", "--surrogate")
        check_same_model(surrogate, model, "--surrogate")
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
                    "%s selects no pool samples (n = %d: k rounds to 0 or no score reaches it)",
                    value.name,
                    plan.n,
                )
        reports: dict[str, Any] = {}
        auto_report = None
        if config.model is not None:
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
                "%s: %d pool samples, γ = %.4g%s",
                value.name,
                value.count,
                value.gamma,
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
                name: {k: entry[k] for k in ("gamma", "count", "holds") if k in entry}
                for name, entry in summary["selections"].items()
            },
        }
        if auto_report is not None:
            result["auto_gamma"] = auto_report["gamma"]
        out.extra["summary"] = result
    return result


# ------------------------------------------------------------------------------ pool access


class Fetcher:
    """Chosen samples back from the pool by (part, offset): no scan, each sample checked
    against the store's key (a pool edited since scoring is an error, not a wrong sample)."""

    def __init__(self, source: Any, pool_paths: list[str]) -> None:
        from batctl.data import open_pool

        self.source = source
        self.store = source.store
        self.pool = open_pool(
            pool_paths, paragraphs=bool(source.params.get("paragraphs", False)), decode=False
        )
        self._part: Any = None
        self._offset: Any = None
        self._keys: Any = None
        self._locations: dict[int, tuple[int, int, str]] = {}
        self._cache: dict[int, Any] = {}

    def load_all_locations(self, keys: Any) -> None:
        """Read the part and offset columns whole (for --dedupe, which reads rows one by one);
        `keys` is the store's key column."""
        self._part = self.store.column("part")
        self._offset = self.store.column("offset")
        self._keys = keys

    def locate(self, rows: Any, keys: Any) -> None:
        """Read part and offset of `rows` only; `keys` is the store's key column."""
        from batctl.selection import read_locations

        if self._part is not None:
            return
        part, offset = read_locations(self.store, rows)
        self._locations = {
            int(r): (int(p), int(o), str(keys[r]))
            for r, p, o in zip(rows.tolist(), part.tolist(), offset.tolist(), strict=True)
        }

    def where(self, row: int) -> tuple[int, int, str]:
        """(part, offset, key) of store row `row`."""
        if self._part is not None:
            return int(self._part[row]), int(self._offset[row]), str(self._keys[row])
        return self._locations[row]

    def raw_row(self, row: int, keep: bool = False) -> Any:
        """The sample of store row `row` (raw bytes, not decoded)."""
        sample = self._cache.get(row)
        if sample is not None:
            return sample
        part, offset, key = self.where(row)
        sample = self.pool.read(part, offset)
        if sample.key != key:
            raise BatctlError(
                f"{self.pool.parts[part].path}: the sample at offset {offset} is {sample.key!r}, "
                f"but the score store expects {key!r}: the pool changed since it was scored; "
                "rescore it (batctl score --force)"
            )
        if keep:
            self._cache[row] = sample
        return sample

    def decoded(self, row: int) -> Any:
        """The decoded sample of `row` (for previews and gradients)."""
        from batctl.data import BadSample

        sample = self.pool.decoded(self.raw_row(row, keep=True))
        if isinstance(sample, BadSample):
            raise BatctlError(
                f"{sample.path} [{sample.key}]: {sample.reason}; it was readable when scored, so "
                "the pool changed: rescore it (batctl score --force)"
            )
        return sample


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
            log.info("--gamma auto: Proposition 2 holds from γ = %s (k = %d)", *chosen)
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


class SampleTar:
    """Writes samples as `webdataset.TarWriter` does (one member `KEY.EXT` per raw member, in
    sorted extension order, user and group "bigdata", mode 0o444), with a fixed mtime so the
    same selection gives the same bytes. Members are written verbatim: TarWriter would gzip a
    `json.gz` member a second time. Plain tarfile, because importing webdataset imports torch
    and select's default path must start fast."""

    def __init__(self, path: Path, mtime: float = 0.0) -> None:
        import tarfile

        self._tarfile = tarfile
        # PAX writes plain ustar headers for ordinary names (TarWriter's bytes exactly) and
        # extended headers only for long or non-ASCII keys, which ustar cannot hold.
        self.tar = tarfile.open(str(path), "w", format=tarfile.PAX_FORMAT)
        self.mtime = mtime

    def write(self, key: str, raw: dict[str, bytes]) -> None:
        import io

        for ext in sorted(raw):
            data = raw[ext]
            info = self._tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = self.mtime
            info.mode = 0o444
            info.uname = info.gname = "bigdata"
            self.tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self.tar.close()


def write_tars(work: Path, plan: Any, fetch: Fetcher | None, top_level: bool) -> None:
    """Every value's samples.tar in one pass over the stream: each chosen sample is read once
    (by part and offset) and written to the tar of every value whose prefix holds it."""
    from batctl.console import progress_bar

    dirs = [(work, 0)] if top_level else [(work / v.name, v.count) for v in plan.values]
    writers: list[tuple[SampleTar, int]] = []
    try:
        for directory, count in dirs:
            directory.mkdir(exist_ok=True)
            writers.append((SampleTar(directory / SAMPLES_TAR), count))
        longest = max((count for _, count in dirs), default=0)
        if longest:
            with progress_bar("fetching selected samples", longest) as advance:
                for j, row in enumerate(plan.stream[:longest].tolist()):
                    sample = fetch.raw_row(row)  # type: ignore[union-attr]
                    for writer, count in writers:
                        if j < count:
                            writer.write(sample.key, sample.raw)
                    advance(1)
    finally:
        for writer, _ in writers:
            writer.close()


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


def write_preview(directory: Path, value: Any, plan: Any, fetch: Fetcher | None) -> None:
    """contact_sheet.png of the first chosen images, or preview.md of the first chosen texts."""
    count = value.count if value is not None else 0
    rows = plan.stream[: min(count, max(PREVIEW_TEXTS, SHEET_IMAGES))].tolist()
    samples = [fetch.decoded(r) for r in rows] if rows else []  # type: ignore[union-attr]
    images = [(j, s) for j, s in enumerate(samples[:SHEET_IMAGES]) if "image" in s.record]
    if images:
        contact_sheet(directory / "contact_sheet.png", images, plan)
        return
    name = value.name if value is not None else "selection"
    lines = [f"# {name}: {count} pool samples ({plan.strategy})", ""]
    if value is not None:
        lines.append(f"γ = {value.gamma:.4g} (n = {plan.n}, k = {count})")
        lines.append("")
    if not samples:
        lines.append("No pool samples selected: training on this selection is plain adaptation.")
    else:
        lines += ["| rank | score | key | sample |", "|---:|---:|---|---|"]
        for j, sample in enumerate(samples[:PREVIEW_TEXTS]):
            text = _cell(_text_of(sample.record))
            score = float(plan.stream_scores[j])
            lines.append(f"| {j + 1} | {score:.4g} | {_cell(sample.key)} | {text} |")
        if count > PREVIEW_TEXTS:
            lines += ["", f"... and {count - PREVIEW_TEXTS} more (all in selection.json)."]
    (directory / "preview.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _text_of(record: dict[str, Any]) -> str:
    if "instruction" in record:
        prompt = record["instruction"] + (f" · {record['input']}" if record.get("input") else "")
        return f"{prompt} → {record.get('output', '')}"
    for name in ("text", "caption"):
        if record.get(name):
            return str(record[name])
    return "(no text)"


def _cell(text: str, limit: int = 240) -> str:
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def contact_sheet(path: Path, images: list[tuple[int, Any]], plan: Any) -> None:
    """A grid of thumbnails, each labelled with its rank and score."""
    from PIL import Image, ImageDraw, ImageOps

    columns = min(8, len(images))
    label = 28
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * THUMB, rows * (THUMB + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (j, sample) in enumerate(images):
        x, y = (i % columns) * THUMB, (i // columns) * (THUMB + label)
        thumb = ImageOps.contain(sample.record["image"].convert("RGB"), (THUMB, THUMB))
        sheet.paste(thumb, (x + (THUMB - thumb.width) // 2, y + (THUMB - thumb.height) // 2))
        draw.text(
            (x + 3, y + THUMB + 2), f"#{j + 1}  {float(plan.stream_scores[j]):.3g}", fill="black"
        )
        draw.text((x + 3, y + THUMB + 14), sample.key[-20:], fill="gray")
    sheet.save(path)


def plot_scores(
    path: Path, columns: Any, plan: Any, values: list[Any], title: str, chosen: Any = None
) -> None:
    """Histogram of every eligible score, each value's score cut marked (albat), the chosen
    samples' scores overlaid for one selection."""
    import numpy as np
    from matplotlib.figure import Figure

    from batctl.selection import cut_of, eligible_rows, histogram

    scores = columns.score[eligible_rows(columns)]
    counts, edges = histogram(scores)
    fig = Figure(figsize=(7, 3.6))
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.15, top=0.9)
    ax = fig.subplots()
    if len(counts):
        ax.stairs(counts, edges, fill=True, alpha=0.35, label=f"eligible ({len(scores)})")
        if chosen is not None and len(chosen):
            picked, _ = np.histogram(np.asarray(chosen, dtype=np.float64), bins=edges)
            ax.stairs(picked, edges, fill=True, alpha=0.8, label=f"selected ({len(chosen)})")
        if counts.max() > 50:
            ax.set_yscale("log")
    cuts = [
        (f"{v.name}: η", float(v.requested))
        if v.kind == "threshold"
        else (f"{v.name}: cut", cut_of(plan, v))
        for v in values
    ]
    for i, (name, x) in enumerate(c for c in cuts if c[1] is not None):
        ax.axvline(x, ls="--", lw=1, color=f"C{(i % 8) + 2}", label=f"{name} {x:.3g}")
    ax.set_xlabel("score s(x)  (higher: a step on x lowers the target loss more)")
    ax.set_ylabel("pool samples")
    ax.set_title(title, fontsize=9)
    if len(counts) or cuts:
        ax.legend(fontsize=7, loc="upper right")
    fig.savefig(path, dpi=90)


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
    path.write_text(
        json.dumps(payload, indent=2, sort_keys=False, allow_nan=True, default=str) + "\n",
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
