"""End-to-end training throughput: runs train_vae.py / train_unet.py as a user would, reads the
steady-state rate from the run's CSV log, and sets it beside the bare model step of
training_throughput.py (same model config, batch and precision): the difference is what the
framework (data loading, Lightning, EMA, logging, checkpoints) costs.

    .venv/bin/python benchmarks/end_to_end.py [--stage both|vae|unet] [--prepare] [--device auto]
        [--precision bf16-mixed] [--json PATH] [OVERRIDE ...]
    .venv/bin/python benchmarks/end_to_end.py --prepare experiment=demo data.subset=512 \\
        trainer.max_steps=96 trainer.log_every_n_steps=8

OVERRIDEs are Hydra overrides given to every stage's script; ``logger=csv``, the device
(``trainer=``) and ``trainer.precision`` are set from the flags, and each run writes to
``runs/bench/<stage>/<time>/``. Steady state is the median of ``perf/samples_per_second`` over
every logging window but the first. ``--prepare`` generates the synthetic data set first and,
when the U-Net stage's VAE export is missing, trains the VAE (measured too) before it; without
it a missing export is an error.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from report import (
    BenchDevice,
    BenchmarkError,
    add_device_arguments,
    markdown_table,
    resolve_device,
    write_json,
)
from training_throughput import (
    COMPILE_MODES,
    ModelSizes,
    measure_steps,
    sizes_from_config,
    unet_workload,
    vae_workload,
)

import ldm.config.schemas  # noqa: F401  (registers the schemas conf/*.yaml name)
from ldm.diffusion import ScheduleConfig

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("vae", "unet")
RATE_COLUMN = "perf/samples_per_second"
FIRST_STEP_COLUMN = "perf/first_step_seconds"
UNITS = {"vae": "images/s", "unet": "latents/s"}
# Set from the flags; the same key given again as an override would contradict them.
RESERVED_KEYS = ("logger", "trainer", "trainer.device", "trainer.precision", "hydra.run.dir")


@dataclass(frozen=True)
class LoggedThroughput:
    """What a run's CSV log says about its speed."""

    window_rates: list[float]  # perf/samples_per_second, one per logging window, in order
    first_step_seconds: float

    @property
    def steady_rate(self) -> float:
        """The median over all windows but the first, which still holds warm-up."""
        return statistics.median(self.window_rates[1:])


def read_throughput(metrics_csv: Path) -> LoggedThroughput:
    """Parse ``<run>/csv/metrics.csv`` as Lightning's CSVLogger writes it: one row per logging
    call, empty cells for metrics that call did not log."""
    if not metrics_csv.is_file():
        raise BenchmarkError(
            f"No CSV log at {metrics_csv}: the run must use logger=csv (this script forces it) "
            "and get as far as its first logging step."
        )
    with metrics_csv.open(newline="") as file:
        reader = csv.DictReader(file)
        columns = reader.fieldnames or []
        rows = list(reader)
    missing = [name for name in (RATE_COLUMN, FIRST_STEP_COLUMN) if name not in columns]
    if missing:
        raise BenchmarkError(
            f"{metrics_csv} has no {' or '.join(missing)} column (it has: "
            f"{', '.join(columns) or 'none'}). The training code must log these through the "
            "run's logger; is this checkout's training code older than the benchmark?"
        )
    rates = [float(row[RATE_COLUMN]) for row in rows if row.get(RATE_COLUMN)]
    firsts = [float(row[FIRST_STEP_COLUMN]) for row in rows if row.get(FIRST_STEP_COLUMN)]
    if len(rates) < 2 or not firsts:
        raise BenchmarkError(
            f"{metrics_csv} holds {len(rates)} {RATE_COLUMN} value(s) and {len(firsts)} "
            f"{FIRST_STEP_COLUMN}: a steady state needs at least 2 logging windows (the first "
            "is dropped). Train for more steps (trainer.max_steps=) or log more often "
            "(trainer.log_every_n_steps=)."
        )
    return LoggedThroughput(rates, firsts[0])


@dataclass(frozen=True)
class EndToEnd:
    """One stage's run beside its bare model step."""

    stage: str
    run_dir: str
    batch: int
    unit: str
    compile: str
    windows: int
    steady_rate: float
    first_step_seconds: float
    wall_seconds: float
    bare_rate: float

    @property
    def overhead_percent(self) -> float:
        """How much slower the real training loop is than the bare step (negative: faster)."""
        return 100 * (1 - self.steady_rate / self.bare_rate)


def compose_stage(stage: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(f"train_{stage}", [o for o in overrides if not o.startswith("hydra.")])


def stage_compile_mode(cfg: DictConfig, device: BenchDevice) -> str:
    """The training run's torch.compile mode (trainer.compile, else the device profile's), so
    the bare step compiles alike; "none" where this checkout's config has no such key."""
    mode = OmegaConf.select(cfg, "trainer.compile") or OmegaConf.select(
        cfg, f"trainer.profiles.{device.type}.compile"
    )
    return mode if mode in COMPILE_MODES else "none"


def prepare_data(cfg: DictConfig) -> None:
    """Generate the synthetic set up front, so its seconds are not counted in a VAE run."""
    if cfg.data.source != "synthetic":
        return
    root = ROOT / cfg.data.root
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in cfg.data.synthetic.items()]
    run_checked([sys.executable, "-m", "ldm.data.synthetic", f"--root={root}", *flags])


def run_checked(command: list[str]) -> float:
    """Run ``command`` from the repository root, its output shown live, with this process's
    CPU thread count (that of the bare step); its wall seconds."""
    print("$", " ".join(command), flush=True)
    environment = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=ROOT, env=environment, check=False)
    if completed.returncode != 0:
        raise BenchmarkError(
            f"{Path(command[1]).name} exited with status {completed.returncode} (output above)."
        )
    return time.perf_counter() - started


def run_stage(
    stage: str, overrides: list[str], device: BenchDevice, bare_steps: int, bare_warmup: int
) -> EndToEnd:
    cfg = compose_stage(stage, overrides)
    run_dir = ROOT / cfg.paths.runs_dir / "bench" / stage / time.strftime("%Y-%m-%d_%H-%M-%S")
    script = str(ROOT / f"train_{stage}.py")
    wall = run_checked([sys.executable, script, *overrides, f"hydra.run.dir={run_dir}"])
    logged = read_throughput(run_dir / "csv" / "metrics.csv")

    batch = int(cfg.data.batch_size)
    compile_mode = stage_compile_mode(cfg, device)
    if stage == "vae":
        sizes = sizes_from_config(cfg)
        workload = vae_workload("ours", sizes.vae, sizes.image_size, batch, device)
    else:
        vae_json = json.loads((ROOT / cfg.vae_export / "vae.json").read_text())
        sizes = ModelSizes(
            vae_json["model_config"], sizes_from_config(cfg).unet, int(cfg.data.image_size)
        )
        schedule = ScheduleConfig(**OmegaConf.to_container(cfg.diffusion, resolve=True))
        workload = unet_workload("ours", sizes.unet, sizes.latent_side, batch, device, schedule)
    timing, _ = measure_steps(
        workload, device, compile_mode=compile_mode, steps=bare_steps, warmup=bare_warmup
    )
    result = EndToEnd(
        stage=stage,
        run_dir=str(run_dir.relative_to(ROOT) if run_dir.is_relative_to(ROOT) else run_dir),
        batch=batch,
        unit=UNITS[stage],
        compile=compile_mode,
        windows=len(logged.window_rates),
        steady_rate=logged.steady_rate,
        first_step_seconds=logged.first_step_seconds,
        wall_seconds=wall,
        bare_rate=batch / timing.seconds_per_call,
    )
    print(
        f"{stage}: end to end {result.steady_rate:,.1f} {result.unit} (median of "
        f"{result.windows - 1} windows after the first), first step "
        f"{result.first_step_seconds:.2f} s, {wall:.0f} s in all; bare step "
        f"{result.bare_rate:,.1f} {result.unit} at batch {batch}, compile={compile_mode} "
        f"→ framework overhead {result.overhead_percent:.1f}%",
        flush=True,
    )
    return result


def check_overrides(overrides: list[str]) -> None:
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if "=" not in override or key in RESERVED_KEYS:
            raise BenchmarkError(
                f"Override {override!r} not accepted: give key=value overrides, and choose the "
                f"device and precision with --device/--precision ({', '.join(RESERVED_KEYS)} "
                "are set by this script)."
            )


def markdown_section(result: dict[str, Any]) -> str:
    """RESULTS.md section: each stage's logged rate beside its bare model step."""
    lines = []
    for row in result["rows"]:
        run = EndToEnd(**row)
        lines.append(
            [
                run.stage,
                run.batch,
                f"{run.steady_rate:,.1f} {run.unit}",
                f"{run.bare_rate:,.1f} {run.unit}",
                f"{run.overhead_percent:.1f}%",
                f"{run.first_step_seconds:.2f}",
                f"{run.windows}",
                f"{run.wall_seconds:.0f}",
                run.compile,
            ]
        )
    overrides = " ".join(result["overrides"]) or "(none)"
    return "\n\n".join(
        [
            "## End to end (train_vae.py / train_unet.py)",
            f"Overrides: `{overrides}`. Steady state: median `{RATE_COLUMN}` over the logging "
            "windows after the first; bare step: training_throughput's step of the same model, "
            "batch and precision; overhead = 1 − end to end ÷ bare.",
            markdown_table(
                [
                    "stage",
                    "batch",
                    "end to end",
                    "bare step",
                    "overhead",
                    "first step s",
                    "windows",
                    "run s",
                    "compile",
                ],
                lines,
            ),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_device_arguments(parser)
    parser.add_argument("--stage", choices=(*STAGES, "both"), default="both")
    parser.add_argument("--prepare", action="store_true", help="generate data / train the VAE")
    parser.add_argument("--bare-steps", type=int, help="timed bare steps (20 on CUDA, else 5)")
    parser.add_argument("--json", type=Path, help="also write the figures here (for run_all)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every stage")
    args = parser.parse_args()
    device = resolve_device(parser, args)
    try:
        rows = run_all_stages(args, device)
    except BenchmarkError as error:
        sys.exit(f"end_to_end.py: {error}")
    write_json(
        args.json,
        {"device": device, "overrides": args.overrides, "rows": [asdict(r) for r in rows]},
    )


def run_all_stages(args: argparse.Namespace, device: BenchDevice) -> list[EndToEnd]:
    check_overrides(args.overrides)
    overrides = [
        *args.overrides,
        "logger=csv",
        f"trainer={device.type}",
        f"trainer.precision={device.precision}",
    ]
    bare_steps = args.bare_steps or (20 if device.type == "cuda" else 5)
    bare_warmup = 3 if device.type == "cuda" else 1
    stages = list(STAGES) if args.stage == "both" else [args.stage]
    if args.prepare:
        prepare_data(compose_stage(stages[0], overrides))
    rows = []
    if "vae" in stages:
        rows.append(run_stage("vae", overrides, device, bare_steps, bare_warmup))
        # The U-Net trains on the VAE just trained (the last value of a key wins in Hydra).
        overrides.append(f"vae_export={ROOT / rows[-1].run_dir / 'export'}")
    if "unet" in stages:
        export = ROOT / compose_stage("unet", overrides).vae_export
        if not (export / "vae.json").is_file():
            if not args.prepare:
                raise BenchmarkError(
                    f"No VAE export at {export}: the U-Net stage needs one. Run "
                    "`python train_vae.py experiment=demo` (with your overrides) first, pass "
                    "vae_export=runs/vae/<run>/export, or add --prepare to train one here."
                )
            rows.append(run_stage("vae", overrides, device, bare_steps, bare_warmup))
            overrides.append(f"vae_export={ROOT / rows[-1].run_dir / 'export'}")
        rows.append(run_stage("unet", overrides, device, bare_steps, bare_warmup))
    return rows


if __name__ == "__main__":
    main()
