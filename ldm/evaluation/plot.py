"""``sweep.png``: the trade-off a guidance sweep shows, one labelled point per setting.

With FID and CLIP score both measured it is the familiar FID-vs-CLIP curve (one line per steps
value, through increasing cfg scales); otherwise each measured metric against the cfg scale.
Drawn with matplotlib's Agg canvas directly: no display, no global pyplot state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ldm.evaluation.adherence import ATTRIBUTES

PLOT_FILENAME = "sweep.png"


def plot_sweep(sweep: list[dict[str, Any]], path: Path) -> Path:
    """Draw the sweep's results (``results.json``'s ``sweep`` list) into a PNG at ``path``."""
    measured = sweep[0]["metrics"]
    if "fid" in measured and "clip_score" in measured:
        figure = Figure(figsize=(6.5, 5), layout="constrained")
        _fid_against_clip(figure.add_subplot(), sweep)
    else:
        series = [name for name in ("fid", "clip_score") if name in measured]
        series += [f"adherence/{split}" for split in measured.get("adherence", {})]
        figure = Figure(figsize=(5 * len(series), 4), layout="constrained")
        for index, name in enumerate(series):
            _against_cfg_scale(figure.add_subplot(1, len(series), index + 1), sweep, name)
    FigureCanvasAgg(figure).print_png(str(path))
    return path


def _by_steps(sweep: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """The settings grouped by step count, each group in increasing cfg scale."""
    groups: dict[int, list[dict[str, Any]]] = {}
    for entry in sorted(sweep, key=lambda entry: entry["cfg_scale"]):
        groups.setdefault(entry["steps"], []).append(entry)
    return groups


def _fid_against_clip(axes: Any, sweep: list[dict[str, Any]]) -> None:
    for steps, entries in _by_steps(sweep).items():
        fids = [entry["metrics"]["fid"] for entry in entries]
        clips = [entry["metrics"]["clip_score"] for entry in entries]
        axes.plot(clips, fids, marker="o", label=f"{entries[0]['sampler']}, {steps} steps")
        for entry, clip, fid in zip(entries, clips, fids, strict=True):
            axes.annotate(
                f"cfg {entry['cfg_scale']:g}",
                (clip, fid),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
    axes.set_xlabel("CLIP score ↑")
    axes.set_ylabel("FID ↓")
    axes.set_title("Guidance sweep: FID against CLIP score")
    axes.legend()


def _against_cfg_scale(axes: Any, sweep: list[dict[str, Any]], name: str) -> None:
    for steps, entries in _by_steps(sweep).items():
        scales = [entry["cfg_scale"] for entry in entries]
        label = f"{entries[0]['sampler']}, {steps} steps"
        if name.startswith("adherence/"):
            split = name.split("/", 1)[1]
            for attribute in ATTRIBUTES:
                values = [
                    100 * entry["metrics"]["adherence"][split]["accuracy"][attribute]
                    for entry in entries
                ]
                axes.plot(scales, values, marker="o", label=f"{attribute} ({label})")
            axes.set_ylabel(f"{split} prompts: attribute shown, %")
        else:
            values = [entry["metrics"][name] for entry in entries]
            axes.plot(scales, values, marker="o", label=label)
            axes.set_ylabel({"fid": "FID ↓", "clip_score": "CLIP score ↑"}[name])
    axes.set_xlabel("cfg scale")
    axes.legend(fontsize=7)
