"""What a person looks at in a selection: preview.md (text), contact_sheet.png (images) and
scores.png (the score histogram with each value's cut)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from batctl.fetch import Fetcher

PREVIEW_TEXTS = 100
"""preview.md shows the first this many chosen texts."""
SHEET_IMAGES = 64
"""contact_sheet.png shows the first this many chosen images."""
THUMB = 128
"""Side of one contact-sheet tile, in pixels."""


def pool_samples(m: int) -> str:
    """`1 pool sample`, `4 pool samples`."""
    return f"{m} pool sample{'' if m == 1 else 's'}"


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
    lines = [f"# {name}: {pool_samples(count)} ({plan.strategy})", ""]
    if value is not None:
        lines.append(f"γ = n / (n + m) = {plan.n} / ({plan.n} + {count}) = {value.gamma:.4g}")
        if value.kind in ("gamma", "auto") and value.requested is not None:
            lines[-1] += f" (asked {float(value.requested):.4g})"
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
