"""``make bench``: every benchmark, at sizes that suit the device, in one run, written to
``benchmarks/RESULTS.md`` with the machine, the software versions and the measured matmul peak.

    .venv/bin/python benchmarks/run_all.py [--device auto] [--precision bf16-mixed] [--threads N]
        [--out benchmarks/RESULTS.md]

On a CPU the sizes are small enough to finish in a few minutes on 2 cores (demo-sized end-to-end
runs on a 512-image subset); on CUDA they are the real ones, plus a torch.compile pass of the
training-step benchmark. Each benchmark runs in its own process (its output shown live); one that
fails is reported in RESULTS.md and makes the run exit non-zero after the others have run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from report import (
    BenchDevice,
    add_device_arguments,
    machine_summary,
    markdown_table,
    resolve_device,
)

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent


@dataclass(frozen=True)
class Job:
    """One benchmark script and the arguments it gets on this device."""

    script: str  # module name in benchmarks/
    args: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return " ".join((f"{self.script}.py", *self.args))


def plan(device: BenchDevice, quick: bool) -> list[Job]:
    """What ``make bench`` measures on this kind of device (``quick``: only that all runs)."""
    if quick:
        return [
            Job(
                "training_throughput",
                (
                    "--configs",
                    "demo",
                    "--batch-sizes",
                    "4",
                    "--vae-batch-sizes",
                    "2",
                    "--steps",
                    "1",
                    "--warmup",
                    "1",
                ),
            ),
            Job("sampling_speed", ("--configs", "demo", "--batch-size", "1")),
            Job("cache_and_text", ("--num-images", "8", "--repeats", "1")),
            Job(
                "end_to_end",
                (
                    "--prepare",
                    "experiment=demo",
                    "data.subset=64",
                    "data.val_subset=16",
                    "trainer.max_steps=12",
                    "trainer.log_every_n_steps=3",
                ),
            ),
        ]
    if device.type == "cuda":
        return [
            Job("training_throughput"),  # U-Net batches 32 and 256, VAE 64; 20 steps
            Job("training_throughput", ("--configs", "default", "--compile", "default")),
            Job("sampling_speed", ("--batch-size", "8")),
            Job("cache_and_text", ("--num-images", "1024")),
            Job(
                "end_to_end",
                (
                    "--prepare",
                    "data=synthetic",
                    "text_encoder.pretrained=null",
                    # 75 steps per epoch: one logging window in five holds an epoch's validation.
                    "data.subset=2400",
                    "trainer.max_steps=375",
                    "trainer.log_every_n_steps=15",
                ),
            ),
        ]
    return [
        Job("training_throughput", ("--steps", "2", "--warmup", "1")),
        Job("sampling_speed", ("--batch-size", "4")),
        Job("cache_and_text", ("--num-images", "32", "--repeats", "3")),
        Job(
            "end_to_end",
            (
                "--prepare",
                "experiment=demo",
                # 32 steps per epoch: one logging window in four holds an epoch's validation.
                "data.subset=512",
                "data.val_subset=32",
                "trainer.max_steps=96",
                "trainer.log_every_n_steps=8",
            ),
        ),
    ]


def run_job(job: Job, device: BenchDevice, threads: int | None, json_path: Path) -> str | None:
    """Run one benchmark; None when it succeeded, else what went wrong."""
    command = [
        sys.executable,
        str(BENCH_DIR / f"{job.script}.py"),
        *job.args,
        f"--device={device.type}",
        f"--precision={device.precision}",
        f"--json={json_path}",
    ]
    if threads:
        command.append(f"--threads={threads}")
    print(f"\n=== {job.label}", flush=True)
    completed = subprocess.run(command, cwd=ROOT, check=False)
    if completed.returncode != 0:
        return f"exited with status {completed.returncode}; its output is in the console log"
    if not json_path.is_file():
        return "finished without writing its figures"
    return None


def git_revision() -> str:
    """The commit measured, marked when the working tree has uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{commit or 'unknown'}{' + uncommitted changes' if dirty else ''}"


def machine_section(machine: dict[str, Any], peak: dict[str, Any] | None) -> str:
    peak_text = (
        f"{peak['flops_per_second'] / 1e9:,.1f} GFLOP/s ({peak['what']})"
        if peak
        else "not measured (training_throughput failed)"
    )
    rows = [
        [
            "CPU",
            f"{machine['cpu']} — {machine['cpu_cores']} cores, {machine['torch_threads']} "
            "torch threads",
        ],
        ["GPU", machine["gpu"] or "none"],
        ["device, precision", f"{machine['device']}, {machine['precision']}"],
        ["measured matmul peak", peak_text],
        ["Python", machine["python"]],
        ["torch / CUDA", f"{machine['torch']} / {machine['cuda'] or 'none'}"],
        ["lightning", machine["lightning"]],
        ["diffusers", machine["diffusers"]],
        ["OS", machine["platform"]],
    ]
    return "## Machine\n\n" + markdown_table(["", ""], rows)


def write_results(
    out: Path,
    device: BenchDevice,
    outcomes: list[tuple[Job, dict[str, Any] | None, str | None]],
    minutes: float,
) -> None:
    peak = next(
        (result["peak"] for job, result, _ in outcomes if result and "peak" in result), None
    )
    sections = [
        "# Benchmark results",
        f"Written by `make bench` (`benchmarks/run_all.py`) on {datetime.now():%Y-%m-%d %H:%M}, "
        f"commit {git_revision()}, in {minutes:.1f} minutes. Figures from different machines "
        "are not comparable; re-run `make bench` to refresh them.",
        machine_section(machine_summary(device), peak),
    ]
    for job, result, error in outcomes:
        if error:
            sections.append(f"## `{job.label}`\n\nFailed: {error}.")
        else:
            module = importlib.import_module(job.script)
            sections.append(module.markdown_section(result))
    out.write_text("\n\n".join(sections) + "\n")
    print(f"\nWrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_arguments(parser)
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "RESULTS.md")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes: checks that every benchmark runs"
    )
    args = parser.parse_args()
    device = resolve_device(parser, args)
    started = time.perf_counter()
    outcomes = []
    with tempfile.TemporaryDirectory() as scratch:
        for index, job in enumerate(plan(device, args.quick)):
            json_path = Path(scratch) / f"{index}-{job.script}.json"
            error = run_job(job, device, args.threads, json_path)
            result = None if error else json.loads(json_path.read_text())
            outcomes.append((job, result, error))
    write_results(args.out, device, outcomes, (time.perf_counter() - started) / 60)
    failed = [job.label for job, _, error in outcomes if error]
    if failed:
        sys.exit(f"run_all.py: {len(failed)} benchmark(s) failed: {'; '.join(failed)}")


if __name__ == "__main__":
    main()
