"""The long-context report: a printed table, JSON, and PNG plots (perplexity by length, passkey heat map)."""

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


def context_length_table(rows: dict[str, dict[int, float]]) -> str:
    """rows: {model name: {context length: value}} -> a fixed-width table, one column per context length;
    the values (perplexity, passkey accuracy) with two decimals."""
    lengths = sorted({length for row in rows.values() for length in row})
    width = max([len(name) for name in rows] + [5]) + 2
    lines = [f"{'model':<{width}}" + "".join(f"{length:>10}" for length in lengths)]
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


def write_json(data: dict, path: str | Path) -> Path:
    Path(path).write_text(json.dumps(data, indent=2, default=str))
    return Path(path)
