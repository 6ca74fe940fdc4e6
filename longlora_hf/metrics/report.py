"""The long-context report: printed tables, JSON, and PNG plots (perplexity by length, passkey and RULER heat
maps)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path


NO_PLOTS = (
    "no PNG plots: matplotlib is not installed (`pip install 'longlora-hf[plots]'` adds it); "
    "the table and JSON have every figure"
)


def plots_available() -> bool:
    """Whether matplotlib (the optional `plots` extra) can draw the PNG plots."""
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("Plots need matplotlib: `pip install 'longlora-hf[plots]'`.") from error
    return plt


def context_length_table(rows: dict[str, dict[int, float]], first_column: str = "model") -> str:
    """rows: {name: {context length: value}} -> a fixed-width table, one column per context length after the
    names' (headed `first_column`); the values (perplexity, passkey accuracy, RULER scores) with two decimals."""
    lengths = sorted({length for row in rows.values() for length in row})
    width = max([len(name) for name in rows] + [5]) + 2
    lines = [f"{first_column:<{width}}" + "".join(f"{length:>10}" for length in lengths)]
    for name, row in rows.items():
        lines.append(
            f"{name:<{width}}"
            + "".join(f"{row[length]:>10.2f}" if length in row else f"{'-':>10}" for length in lengths)
        )
    return "\n".join(lines)


def plot_perplexity(rows: dict[str, dict[int, float]], path: str | Path) -> Path:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, row in rows.items():
        lengths = sorted(row)
        axis.plot(lengths, [row[length] for length in lengths], marker="o", label=name)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("evaluation context length (tokens)")
    axis.set_ylabel("perplexity")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)


def plot_passkey(accuracy: dict[int, dict[float, float]], path: str | Path, title: str = "passkey retrieval") -> Path:
    plt = _pyplot()
    lengths = sorted(accuracy)
    depths = sorted({depth for row in accuracy.values() for depth in row})
    grid = [[accuracy[length].get(depth, float("nan")) for length in lengths] for depth in depths]
    figure, axis = plt.subplots(figsize=(6, 4))
    image = axis.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
    axis.set_xticks(range(len(lengths)), [str(length) for length in lengths])
    axis.set_yticks(range(len(depths)), [f"{depth:.2f}" for depth in depths])
    axis.set_xlabel("context length (tokens)")
    axis.set_ylabel("depth of the key")
    axis.set_title(title)
    figure.colorbar(image, label="accuracy")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)


def ruler_table(result: dict) -> str:
    """One RULER result (`ruler_evaluation`'s) as a table: a row per task and the average, a column per length, then
    the effective length."""
    rows = {task: by_length for task, by_length in result["scores"].items()}
    rows["average"] = result["average"]
    found = result["effective_length"]
    effective = f"effective length: {found if found is not None else 'none'} (threshold {result['threshold']})"
    return context_length_table(rows, "task") + "\n" + effective


def plot_ruler(result: dict, path: str | Path, title: str = "RULER") -> Path:
    """A heat map of one RULER result: tasks and their average by length, scores 0-100."""
    plt = _pyplot()
    lengths = sorted(result["average"])
    names = [*result["scores"], "average"]
    grid = [[(result["scores"].get(name) or result["average"])[length] for length in lengths] for name in names]
    figure, axis = plt.subplots(figsize=(7, 0.45 * len(names) + 1.5))
    image = axis.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
    axis.set_xticks(range(len(lengths)), [str(length) for length in lengths])
    axis.set_yticks(range(len(names)), names)
    for row, values in enumerate(grid):
        for column, value in enumerate(values):
            axis.text(column, row, f"{value:.0f}", ha="center", va="center", fontsize=8)
    axis.set_xlabel("context length (tokens)")
    found = result["effective_length"]
    axis.set_title(f"{title} (effective length: {found if found is not None else 'none'})")
    figure.colorbar(image, label="score")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)


def regression_lines(reports: list[dict]) -> list[str]:
    """The short-context regression of each model against the first (the base, before extension): perplexity at
    the shortest evaluated length and, with RULER, the average score at its shortest length. Each report names its
    model under "name"."""
    lines = []
    base = reports[0]
    for report in reports[1:]:
        perplexity, reference = report["perplexity"]["by_context_length"], base["perplexity"]["by_context_length"]
        length = min(set(perplexity) & set(reference))
        ours, theirs = perplexity[length]["perplexity"], reference[length]["perplexity"]
        lines.append(
            f"short-context regression of {report['name']} against {base['name']} at {length} tokens: perplexity "
            f"{ours:.2f} vs {theirs:.2f} ({100 * (ours / theirs - 1):+.1f}%)"
        )
        if "ruler" in report and "ruler" in base:
            shared = set(report["ruler"]["average"]) & set(base["ruler"]["average"])
            if shared:
                length = min(shared)
                ours, theirs = report["ruler"]["average"][length], base["ruler"]["average"][length]
                lines.append(
                    f"short-context regression of {report['name']} against {base['name']} at {length} tokens: RULER "
                    f"average {ours:.1f} vs {theirs:.1f} ({ours - theirs:+.1f} points)"
                )
    return lines


def write_json(data: dict, path: str | Path) -> Path:
    Path(path).write_text(json.dumps(data, indent=2, default=str))
    return Path(path)
