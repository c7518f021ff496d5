"""Plots a reader can trust: reference lines for the backbone and θ*, axes that span them."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from batctl.metrics import report  # noqa: E402


def test_heldout_plot_has_backbone_and_oracle_lines_and_spans_them(tmp_path: Path, monkeypatch):
    import matplotlib.pyplot as plt

    saved = {}
    real_close = plt.close

    def keep(fig):  # inspect the figure before it is closed
        saved["fig"] = fig
        real_close(fig)

    monkeypatch.setattr(plt, "close", keep)
    rows = {
        "backbone": {"heldout_loss": 6.30},
        "none": {"heldout_loss": 5.105},
        "albat": {"heldout_loss": 5.100},
    }
    report.plot_heldout(rows, tmp_path / "h.png", reference=4.2)
    assert (tmp_path / "h.png").stat().st_size > 0
    ax = saved["fig"].axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert any(label.startswith("backbone 6.3") for label in labels)
    assert any(label.startswith("oracle θ* 4.2") for label in labels)
    low, high = ax.get_ylim()
    # the 0.005 gap between the adapters is read against backbone -> oracle, not blown up
    assert low < 4.2 and high > 6.30 and (high - low) > 2.0
    assert not ax.patches  # points, not bars on a zoomed axis
