"""Each research option against the default, on the demo: held-out and training prompt adherence
per attribute, the final validation loss and the wall time, from one command.

    .venv/bin/python benchmarks/compare_options.py [--vae-export PATH] [--only NAME ...]
        [--variant a|b] [--out DIR]

Every option is one config switch on top of ``experiment=demo`` (the same data, VAE, epochs,
seed and sampling settings), so a row differs from the default in that switch alone (the
v-prediction row also sets the β schedule the demo used with that objective). The VAE is
trained once (or given with ``--vae-export``) and the stage-2 caches are built once before the
first timed run, so the wall times compare the stage-2 training runs themselves. Samples are judged
by ``evaluate.py metrics=[adherence]`` at the demo's sampling settings (25 steps, CFG 3; Euler
for the demo's flow-matching objective, DDIM for the v-prediction row). Writes
``comparison.json`` and ``comparison.md`` into the output folder and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from report import machine_summary, markdown_table, measure_matmul_peak, pick_device

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from demo import VARIANTS  # noqa: E402  (the demo's data configs and folders)

ATTRIBUTES = ("background", "color", "shape", "size")
# ≥ 96 images per split, as the demo's own evaluation: 24 training prompts × 4, 17 held-out × 6.
EVALUATION = ["metrics=[adherence]", "cfg_scales=[3]", "adherence.prompts=24"]
IMAGES_PER_PROMPT = "adherence.images_per_prompt=6"


@dataclass(frozen=True)
class Option:
    """A row of the table: its train_unet.py overrides (sampling follows the checkpoint)."""

    train: tuple[str, ...] = ()
    note: str = ""


OPTIONS: dict[str, Option] = {
    "default": Option(note="experiment=demo as it is"),
    "latent_norm=per_channel": Option(("latent_norm=per_channel",)),
    "objective=ddpm": Option(
        ("diffusion.objective=ddpm", "diffusion.beta_schedule=scaled_linear"),
        note="v-prediction loss: not comparable with the flow-matching (velocity) losses",
    ),
    "noise_offset=0.1": Option(("diffusion.noise_offset=0.1",)),
    "input_perturbation=0.1": Option(("diffusion.input_perturbation=0.1",)),
    "text_refiner_layers=0": Option(("model.dit.text_refiner_layers=0",)),
    "pooled_text=false": Option(("model.dit.pooled_text=false",), note="cross-attention alone"),
    "denoiser=unet": Option(("model.denoiser=unet",), note="the demo's U-Net, no refiner"),
    "unet+pooled_text": Option(("model.denoiser=unet", "model.unet.pooled_text=true")),
}


def run(command: list[str], log: Path) -> float:
    """Run ``command`` from the repository root with its output in ``log``; seconds taken."""
    print(f"$ {' '.join(command[1:])}  (log: {log})", flush=True)
    started = time.perf_counter()
    with log.open("w") as stream:
        completed = subprocess.run(command, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT)
    if completed.returncode != 0:
        sys.exit(f"compare_options.py: {command[1]} exited {completed.returncode}; see {log}")
    return time.perf_counter() - started


def final_val_loss(run_dir: Path) -> float:
    """The last ``val/loss`` the run's CSV logger wrote."""
    with (run_dir / "csv" / "metrics.csv").open() as stream:
        values = [row["val/loss"] for row in csv.DictReader(stream) if row.get("val/loss")]
    return float(values[-1]) if values else math.nan


def adherence(results_json: Path) -> dict[str, dict[str, Any]]:
    """Per split: accuracy per attribute and the image count, from evaluate.py's results.json."""
    row = json.loads(results_json.read_text())["sweep"][0]["metrics"]["adherence"]
    return {split: row[split] for split in ("heldout", "train")}


def compare(name: str, option: Option, base: list[str], vae_export: Path, out: Path) -> dict:
    python, run_dir = sys.executable, out / name.replace("=", "-")
    run_dir.mkdir(parents=True, exist_ok=True)
    train = [
        python,
        "train_unet.py",
        *base,
        f"vae_export={vae_export}",
        f"hydra.run.dir={run_dir}",
        "logger=csv",
        "evaluation.every_n_steps=null",
        *option.train,
    ]
    seconds = run(train, run_dir / "train.log")
    evaluate = [
        python,
        "evaluate.py",
        *base,
        f"ckpt={run_dir / 'export'}",
        *EVALUATION,
        IMAGES_PER_PROMPT,
        f"out_dir={run_dir / 'evaluation'}",
    ]
    run(evaluate, run_dir / "evaluate.log")
    return {
        "option": name,
        "overrides": list(option.train),
        "note": option.note,
        "train_seconds": seconds,
        "final_val_loss": final_val_loss(run_dir),
        "adherence": adherence(run_dir / "evaluation" / "results.json"),
    }


def table(rows: list[dict]) -> str:
    def scores(row: dict, split: str) -> list[str]:
        accuracy = row["adherence"][split]["accuracy"]
        return [f"{100 * accuracy[attribute]:.0f}" for attribute in ATTRIBUTES]

    header = ["option", *(f"held-out {a}" for a in ATTRIBUTES), "train bg/col/shape/size"]
    header += ["final val loss", "U-Net min"]
    body = [
        [
            row["option"],
            *scores(row, "heldout"),
            "/".join(scores(row, "train")),
            f"{row['final_val_loss']:.4f}" + (" *" if row["option"] == "objective=ddpm" else ""),
            f"{row['train_seconds'] / 60:.1f}",
        ]
        for row in rows
    ]
    return markdown_table(header, body)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae-export", type=Path, help="default: train the demo VAE first")
    parser.add_argument("--only", nargs="+", choices=sorted(OPTIONS), help="default: every option")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="a", help="synthetic set")
    parser.add_argument("--out", type=Path, help="default: runs/compare/<date_time>")
    args = parser.parse_args(argv)
    out = (args.out or ROOT / "runs/compare" / f"{datetime.now():%Y-%m-%d_%H-%M-%S}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_config, data_root, _ = VARIANTS[args.variant]
    base = ["experiment=demo", f"data={data_config}", f"data.root={(ROOT / data_root).resolve()}"]
    python = sys.executable
    generate = [python, "-m", "ldm.data.synthetic", f"--root={ROOT / data_root}"]
    run([*generate, f"--variant={args.variant}"], out / "data.log")
    vae_export = args.vae_export
    if vae_export is None:
        vae_dir = out / "vae"
        vae_dir.mkdir(exist_ok=True)
        train_vae = [python, "train_vae.py", *base, f"hydra.run.dir={vae_dir}", "logger=csv"]
        run(train_vae, out / "vae.log")
        vae_export = vae_dir / "export"
    vae_export = vae_export.resolve()
    run([python, "-m", "ldm.caches", *base, f"vae_export={vae_export}"], out / "caches.log")

    names = args.only or list(OPTIONS)
    rows = [compare(name, OPTIONS[name], base, vae_export, out) for name in names]
    peak = measure_matmul_peak(pick_device("cpu"))
    text = "\n\n".join(
        [
            f"# Options on the demo (variant {args.variant}), {datetime.now():%Y-%m-%d %H:%M}",
            f"Machine: {machine_summary(pick_device('cpu'))['cpu']}, {peak.gflops:.0f} GFLOP/s "
            f"({peak.what}). VAE: {vae_export}. Adherence in % at CFG 3, 25 steps.",
            table(rows),
            "\\* " + OPTIONS["objective=ddpm"].note if "objective=ddpm" in names else "",
        ]
    ).strip()
    (out / "comparison.md").write_text(text + "\n")
    payload = {"gflops": peak.gflops, "vae_export": str(vae_export), "rows": rows}
    (out / "comparison.json").write_text(json.dumps(payload, indent=2))
    print(text)


if __name__ == "__main__":
    main()
