"""A slicing sweep on paper: a markdown table, perplexity against parameters kept, eigenvalue spectra.

A report is a dict (what `lmslice report` writes as report.json): `model`, `eval_data`, `tasks`,
`parameters_dense`, `rows` (one per sparsity: `sparsity`, `width`, `parameters`, `parameters_fraction`,
`perplexity`, `zero_shot_average`) and `spectra` (`sparsity` and `values`, as in `SliceResult.spectra`).

A frontier report (`lmslice report --target-params`) compares compression modes at real parameter
budgets instead: `dense` (the dense model's row) and `rows`, one per (budget, mode): `target_params`,
`mode`, `shape`, `parameters`, `parameters_fraction`, `perplexity`, `perplexity_ratio`, `seconds`,
`zero_shot_average`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lmslice.errors import LmsliceError


def write_report(report: dict[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Writes report.json, report.md, perplexity.png and spectra.png into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("report.json", "report.md", "perplexity.png", "spectra.png")}
    paths["report.json"].write_text(json.dumps(report) + "\n")
    paths["report.md"].write_text(format_markdown(report) + "\n")
    name = Path(report["model"]).name
    plot_perplexity(report["rows"], paths["perplexity.png"], title=f"{name} on {report['eval_data']}")
    spectra = report["spectra"]
    widths = {row["sparsity"]: row["width"] for row in report["rows"] if row["sparsity"] > 0}
    plot_spectra(spectra["values"], paths["spectra.png"], widths=widths,
                 title=f"{name}: eigenvalues of each block's output (sliced at {spectra['sparsity']:g})")
    return paths


def format_markdown(report: dict[str, Any]) -> str:
    zero_shot = bool(report.get("tasks"))
    header = "| sparsity | width | parameters | % of dense | perplexity |" + (" zero-shot avg |" if zero_shot else "")
    lines = [f"# lmslice report: {report['model']}", "",
             f"Perplexity on {report['eval_data']}"
             + (f"; zero-shot average over {', '.join(report['tasks'])} (acc_norm where defined, else acc)"
                if zero_shot else "") + ".", "",
             header, "|" + "---|" * (header.count("|") - 1)]
    for row in report["rows"]:
        cells = [f"{row['sparsity']:g}", str(row["width"]), f"{row['parameters'] / 1e6:.2f}M",
                 f"{100 * row['parameters_fraction']:.1f}", f"{row['perplexity']:.3f}"]
        if zero_shot:
            cells.append(f"{row['zero_shot_average']:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_perplexity(rows: list[dict[str, Any]], path: str | os.PathLike[str], *, title: str = "") -> Path:
    """Perplexity (log scale) against the fraction of parameters kept, each point labelled by sparsity."""
    figure, axes = _figure()
    points = sorted(rows, key=lambda row: row["parameters_fraction"])
    perplexities = [row["perplexity"] for row in points]
    axes.plot([row["parameters_fraction"] for row in points], perplexities, marker="o")
    spots = (((row["parameters_fraction"], row["perplexity"]), row["sparsity"]) for row in points)
    for point, sparsities in _labels(spots).items():
        axes.annotate(sparsities, point, textcoords="offset points", xytext=(4, 4), fontsize=8)
    if max(perplexities) > 4 * min(perplexities):  # a log axis only helps when perplexity explodes
        _log_y(axes)
    axes.set_xlabel("fraction of parameters kept")
    axes.set_ylabel("perplexity")
    axes.set_title(title or "perplexity against size (labels: sparsity)", fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    return _save(figure, path)


def write_frontier_report(report: dict[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Writes report.json, report.md and frontier.png into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("report.json", "report.md", "frontier.png")}
    paths["report.json"].write_text(json.dumps(report) + "\n")
    paths["report.md"].write_text(format_frontier_markdown(report) + "\n")
    plot_frontier(report["rows"], report["dense"]["perplexity"], paths["frontier.png"],
                  title=f"{Path(report['model']).name} on {report['eval_data']}")
    return paths


def format_frontier_markdown(report: dict[str, Any]) -> str:
    zero_shot = bool(report.get("tasks"))
    header = ("| budget | mode | shape | real params % | perplexity | × dense | seconds |"
              + (" zero-shot avg |" if zero_shot else ""))
    lines = [f"# lmslice report: {report['model']}", "",
             f"Perplexity on {report['eval_data']} at fractions of the dense model's real parameters (every "
             "tensor once, a tied embedding once)"
             + (f"; zero-shot average over {', '.join(report['tasks'])} (acc_norm where defined, else acc)"
                if zero_shot else "") + ".", "",
             header, "|" + "---|" * (header.count("|") - 1)]
    dense = report["dense"]
    for row in [{**dense, "target_params": 1, "mode": "dense", "perplexity_ratio": 1.0, "seconds": None},
                *report["rows"]]:
        cells = [f"{row['target_params']:g}", row["mode"], row["shape"], f"{100 * row['parameters_fraction']:.1f}",
                 f"{row['perplexity']:.3f}", f"{row['perplexity_ratio']:.3f}",
                 "" if row["seconds"] is None else f"{row['seconds']:.1f}"]
        if zero_shot:
            cells.append(f"{row['zero_shot_average']:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def frontier_figure(rows: list[dict[str, Any]], dense_perplexity: float, *, title: str = "") -> Any:
    """Perplexity against the fraction of real parameters kept: one line with markers per mode (in the
    order the rows first name them) and the dense model as a dashed horizontal reference."""
    figure, axes = _figure()
    modes = list(dict.fromkeys(row["mode"] for row in rows))
    for mode in modes:
        points = sorted((row["parameters_fraction"], row["perplexity"]) for row in rows if row["mode"] == mode)
        axes.plot([x for x, _ in points], [y for _, y in points], marker="o", label=mode)
    axes.axhline(dense_perplexity, color="grey", linestyle="--", linewidth=1, label=f"dense ({dense_perplexity:.2f})")
    perplexities = [dense_perplexity, *(row["perplexity"] for row in rows)]
    if max(perplexities) > 4 * min(perplexities):  # a log axis only helps when perplexity explodes
        _log_y(axes)
    axes.set_xlabel("fraction of real parameters kept")
    axes.set_ylabel("perplexity")
    axes.set_title(title or "perplexity against real size", fontsize=9)
    axes.legend(fontsize=8)
    axes.grid(True, which="both", alpha=0.3)
    return figure


def plot_frontier(rows: list[dict[str, Any]], dense_perplexity: float, path: str | os.PathLike[str], *,
                  title: str = "") -> Path:
    return _save(frontier_figure(rows, dense_perplexity, title=title), path)


def plot_spectra(spectra: dict[str, list[float]], path: str | os.PathLike[str], *, signal: str = "output",
                 blocks: int = 6, widths: dict[float, int] | None = None, title: str = "") -> Path:
    """Eigenvalues (log scale, descending) of `block{i}.{signal}` for about `blocks` evenly spaced blocks,
    coloured from first (dark) to last (light); dashed lines at the kept widths of `widths`
    (sparsity -> width)."""
    from matplotlib import colormaps

    indices = sorted(int(match.group(1)) for key in spectra
                     if (match := re.fullmatch(rf"block(\d+)\.{re.escape(signal)}", key)))
    if not indices:
        raise LmsliceError(f"no block{{i}}.{signal} spectra to plot")
    step = max(1, math.ceil(len(indices) / blocks))
    chosen = indices[::step] if indices[-1] in indices[::step] else [*indices[::step], indices[-1]]
    figure, axes = _figure()
    colours = colormaps["viridis"]
    for position, index in enumerate(chosen):
        # round-off can leave the smallest eigenvalues at or below zero, which a log axis cannot show
        values = [value if value > 0 else float("nan") for value in spectra[f"block{index}.{signal}"]]
        axes.plot(range(1, len(values) + 1), values, color=colours(position / max(1, len(chosen) - 1)),
                  label=f"block {index}", linewidth=1.2)
    for width, sparsities in _labels((width, sparsity) for sparsity, width in sorted((widths or {}).items())).items():
        axes.axvline(width, color="grey", linestyle="--", linewidth=0.8)
        axes.annotate(sparsities, (width, 1), xycoords=("data", "axes fraction"), xytext=(2, -10),
                      textcoords="offset points", fontsize=7, color="grey")
    axes.set_yscale("log")
    axes.set_xlabel("principal component")
    axes.set_ylabel("eigenvalue")
    axes.set_title(title or f"eigenvalues of block {signal}s", fontsize=9)
    axes.legend(fontsize=7)
    axes.grid(True, which="major", alpha=0.3)
    return _save(figure, path)


def _labels(pairs: Iterable[tuple[Any, float]]) -> dict[Any, str]:
    """Sparsities that land on the same spot (rounding can give two the same width) share one label."""
    labels: dict[Any, list[str]] = {}
    for spot, sparsity in pairs:
        labels.setdefault(spot, []).append(f"{sparsity:g}")
    return {spot: ", ".join(names) for spot, names in labels.items()}


def _log_y(axes: Any) -> None:
    """A log perplexity axis labelled 40, 60, 100 rather than 4×10¹, 6×10¹, 10²."""
    from matplotlib.ticker import LogFormatter

    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    axes.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _figure() -> tuple[Any, Any]:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise LmsliceError("plotting needs matplotlib: pip install 'lmslice[plot]'") from error
    # A bare Figure renders with Agg and leaves pyplot's global backend and state alone.
    figure = Figure(figsize=(6.4, 4.2), dpi=120, layout="constrained")
    return figure, figure.add_subplot()


def _save(figure: Any, path: str | os.PathLike[str]) -> Path:
    figure.savefig(path, format="png")
    return Path(path)
