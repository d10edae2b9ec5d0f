"""PNG plot of a tuning run. Imported only for ``tune --plot``: matplotlib is optional."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from chunker.params import format_size
from chunker.tune import SettingReport


def write_plot(reports: Sequence[SettingReport], chosen: SettingReport, path: Path) -> None:
    """Write dedup ratio and metadata overhead against average size as a PNG to ``path``.

    Raises ImportError without matplotlib, OSError if ``path`` cannot be written.
    """
    # The object API with an explicit Agg canvas: no pyplot global state, no GUI backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    averages = [report.params.avg_size for report in reports]
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    dedup_axes = figure.add_subplot()
    overhead_axes = dedup_axes.twinx()

    dedup_axes.plot(averages, [r.dedup_ratio for r in reports], "o-", color="tab:blue")
    overhead_axes.plot(averages, [100 * r.overhead for r in reports], "s--", color="tab:orange")
    dedup_axes.axvline(chosen.params.avg_size, color="grey", linestyle=":", linewidth=1)

    dedup_axes.set_xscale("log", base=2)
    dedup_axes.set_xticks(averages, [format_size(a) for a in averages])
    dedup_axes.minorticks_off()
    dedup_axes.set_xlabel("average chunk size (min = avg/4, max = avg*4)")
    dedup_axes.set_ylabel("dedup ratio (total / unique bytes)", color="tab:blue")
    overhead_axes.set_ylabel("metadata overhead (% of unique bytes)", color="tab:orange")
    dedup_axes.set_title(f"chunker tune: recommended {chosen.params} (dotted line)")
    figure.savefig(path, format="png", dpi=100)
