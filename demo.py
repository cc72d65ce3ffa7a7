"""``make demo``: the whole pipeline on the embedded synthetic set, then one summary.

Runs the same commands a user would type — generate the data, ``train_vae.py``,
``train_unet.py``, ``sample.py``, ``evaluate.py metrics=[adherence]`` — each in its own process
with its own progress bars, and ends with what a newcomer wants to know: how long each stage
took, how often the samples show what the prompts ask (with chance and the VAE's ceiling beside
it), where the pictures are and what the analyser reads in the grid's.

    python demo.py [--prompt "a small red circle on a blue background"] [--variant a|b]

``--variant b`` runs the same recipe on the second synthetic set (another palette, other caption
templates and held-out pairs; ``conf/data/synthetic_b.yaml``), which the recipe was never tuned on.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from PIL import Image

from ldm.data.synthetic import caption_attributes, read_attributes
from ldm.evaluation.adherence import ATTRIBUTES, dataset_config
from ldm.sampling import read_png_metadata

ROOT = Path(__file__).resolve().parent
ADHERENCE_HEADING = "## Prompt adherence"
# Each synthetic variant: its data config (conf/data/), default folder and a prompt in its words.
VARIANTS = {
    "a": ("synthetic", Path("data/synthetic"), "a small red circle on a blue background"),
    "b": ("synthetic_b", Path("data/synthetic-b"), "a small disc painted magenta, set on navy"),
}


@dataclass(frozen=True)
class Stage:
    """One command of the demo and what to call it in the summary."""

    name: str
    command: list[str]


def demo_stages(prompt: str, variant: str, data_root: Path, out_dir: Path) -> list[Stage]:
    """The demo's commands in order; each stage reads what the one before it wrote."""
    python = sys.executable
    data_config = VARIANTS[variant][0]
    demo = ["experiment=demo", f"data={data_config}", f"data.root={data_root}"]
    generate = [python, "-m", "ldm.data.synthetic", f"--root={data_root}", f"--variant={variant}"]
    return [
        Stage("synthetic data", generate),
        Stage("VAE (stage 1)", [python, "train_vae.py", *demo]),
        Stage("denoiser (stage 2, caches included)", [python, "train_unet.py", *demo]),
        Stage(
            "samples",
            [
                python,
                "sample.py",
                *demo,
                f"prompt={hydra_string(prompt)}",
                "n=4",
                f"out_dir={out_dir}/samples",
            ],
        ),
        Stage(
            "adherence evaluation",
            [
                python,
                "evaluate.py",
                *demo,
                "metrics=[adherence]",
                "cfg_scales=[1,3,7.5]",
                # ≥ 96 images per split: 24 training prompts × 4, 17 held-out combinations × 6.
                "adherence.prompts=24",
                "adherence.images_per_prompt=6",
                f"out_dir={out_dir}/evaluation",
            ],
        ),
    ]


def hydra_string(text: str) -> str:
    """``text`` quoted for a Hydra override, so commas, brackets or quotes in a prompt stay text."""
    # Hydra reads a backslash as an escape only before a quote (or the closing quote): double
    # those runs of backslashes and escape the quotes; every other character stays as it is.
    escaped = re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ("\\'" if m[2] else ""), text)
    return f"'{escaped}'"


def run_stage(stage: Stage) -> float:
    """Run one stage with its output shown live; its wall time in seconds."""
    print(f"\n=== {stage.name}: {' '.join(stage.command[1:])}", flush=True)
    started = time.perf_counter()
    completed = subprocess.run(stage.command, cwd=ROOT, check=False)
    if completed.returncode != 0:
        sys.exit(f"demo.py: the {stage.name} stage failed (exit status {completed.returncode}).")
    return time.perf_counter() - started


def adherence_table(results_markdown: Path) -> str:
    """The adherence section of ``evaluate.py``'s results.md (chance and VAE ceiling included)."""
    text = results_markdown.read_text()
    start = text.find(ADHERENCE_HEADING)
    if start < 0:
        return f"(no adherence table in {results_markdown})"
    end = text.find("\n## ", start + len(ADHERENCE_HEADING))
    return text[start : end if end > 0 else len(text)].strip()


def grid_verdict(prompt: str, samples_dir: Path, data_root: Path) -> str:
    """What the analyser reads in each image of the prompt's grid, against what the prompt asks:
    the grid a newcomer looks at first, judged like the adherence table's images."""
    spec = dataset_config(data_root).variant_spec
    asked = caption_attributes(prompt, spec)
    if asked is None:
        return "Grid not judged: the prompt is in none of the set's caption wordings."
    images = {  # the grid's own images: sample.py records each one's prompt and seed
        path: metadata
        for path in sorted(samples_dir.glob("*.png"))
        if "seed" in (metadata := read_png_metadata(path)) and metadata["prompt"] == prompt
    }
    misread = []
    for path, metadata in images.items():
        read = read_attributes(Image.open(path), spec.palette)
        judged = [name for name in ATTRIBUTES if name in asked]
        wrong = [f"{name} {read[name]}" for name in judged if read[name] != asked[name]]
        if wrong:
            misread.append(f"seed {metadata['seed']} reads {', '.join(wrong)}")
    verdict = f"Grid judged by the analyser: {len(images) - len(misread)} of {len(images)} images "
    verdict += "show everything the prompt asks"
    return verdict + (f"; {'; '.join(misread)}." if misread else ".")


def summary(timings: list[tuple[str, float]], out_dir: Path, verdict: str | None = None) -> str:
    total = sum(seconds for _, seconds in timings)
    width = max(len(name) for name, _ in timings)
    lines = ["", "=" * 72, "Demo finished", "", "Time per stage:"]
    lines += [f"  {name:<{width}}  {seconds / 60:5.1f} min" for name, seconds in timings]
    lines += [f"  {'total':<{width}}  {total / 60:5.1f} min", ""]
    lines += [adherence_table(out_dir / "evaluation" / "results.md"), ""]
    grids = sorted((out_dir / "samples").glob("*-grid.png"))
    lines += [f"Sample grid: {grid}" for grid in grids]
    lines += [] if verdict is None else [verdict]
    lines += [f"Evaluation (JSON, table, plot, every sample): {out_dir / 'evaluation'}", "=" * 72]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default=None, help="default: one in the variant's words")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="a", help="synthetic set")
    parser.add_argument("--root", type=Path, default=None, help="data folder (default per variant)")
    parser.add_argument("--out", type=Path, default=None, help="default: runs/demo/<date_time>")
    args = parser.parse_args(argv)
    out_dir = args.out or Path("runs/demo") / f"{datetime.now():%Y-%m-%d_%H-%M-%S}"
    _, default_root, default_prompt = VARIANTS[args.variant]
    data_root, prompt = args.root or default_root, args.prompt or default_prompt
    out_dir, data_root = out_dir.resolve(), data_root.resolve()
    timings = [
        (stage.name, run_stage(stage))
        for stage in demo_stages(prompt, args.variant, data_root, out_dir)
    ]
    verdict = grid_verdict(prompt, out_dir / "samples", data_root)
    print(summary(timings, out_dir, verdict))


if __name__ == "__main__":
    main()
