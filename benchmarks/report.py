"""What every benchmark shares: the device and precision flags, synchronised timing, the measured
matmul peak that MFU is relative to, FLOP counting, the machine's description and Markdown.

Benchmarks are run as scripts (``python benchmarks/<name>.py``), so they import this module as
``report``; their ``--json`` results are what ``run_all.py`` turns into ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")
PRECISION_CHOICES = ("bf16-mixed", "32-true")
# Square matmul sides for the peak: big enough to saturate each kind of device, small enough
# to take a few seconds on a 2-core CPU (fp32 3072³ ≈ 58 GFLOP per product).
PEAK_MATMUL_SIDE = {"cuda": 8192, "mps": 4096, "cpu": 3072}


class BenchmarkError(RuntimeError):
    """A benchmark cannot run as asked; the message says why and what to do."""


@dataclass(frozen=True)
class BenchDevice:
    """The device a benchmark runs on and the precision it computes in."""

    type: str  # cuda | mps | cpu
    precision: str  # bf16-mixed | 32-true

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.type)

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16-mixed" else torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for bf16-mixed, as Lightning's precision plugin does; else nothing."""
        if self.precision == "32-true":
            return contextlib.nullcontext()
        return torch.autocast(self.type, dtype=torch.bfloat16)

    def synchronize(self) -> None:
        """Wait for queued device work, so host clocks measure the work and not its launch."""
        if self.type == "cuda":
            torch.cuda.synchronize()
        elif self.type == "mps":
            torch.mps.synchronize()

    def describe(self) -> str:
        name = torch.cuda.get_device_name() if self.type == "cuda" else self.type
        return f"{name}, {self.precision}, {torch.get_num_threads()} CPU threads"


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--precision`` and ``--threads``, the same in every benchmark."""
    parser.add_argument(
        "--device", default="auto", choices=DEVICE_CHOICES, help="auto: CUDA, else MPS, else CPU"
    )
    parser.add_argument(
        "--precision",
        default=None,
        choices=PRECISION_CHOICES,
        help="default: bf16-mixed on CUDA, 32-true elsewhere (as the trainer's device profiles)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def resolve_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> BenchDevice:
    """The device asked for, or one clear ``parser.error`` (no traceback) when it is absent."""
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = pick_device(args.device, args.precision)
    except BenchmarkError as error:
        parser.error(str(error))
    if device.type == "cuda":
        # As the trainer's CUDA profile: TF32 for any fp32 matmul or convolution, and cuDNN
        # picks the fastest convolution for each (fixed) shape during the warm-up steps.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return device


def pick_device(requested: str, precision: str | None = None) -> BenchDevice:
    """CUDA > MPS > CPU for ``auto``; a named device must exist."""
    mps = torch.backends.mps.is_available()
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError(
            f"--device cuda: no CUDA GPU is visible to PyTorch (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda}). Use --device auto or --device cpu."
        )
    if requested == "mps" and not mps:
        raise BenchmarkError(
            "--device mps: Apple MPS is not available here (it needs macOS 12.3+ on Apple "
            "silicon). Use --device auto or --device cpu."
        )
    precision = precision or ("bf16-mixed" if requested == "cuda" else "32-true")
    if requested == "cuda" and precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
        raise BenchmarkError(
            f"--precision bf16-mixed: {torch.cuda.get_device_name()} has no bfloat16 support. "
            "Use --precision 32-true."
        )
    return BenchDevice(requested, precision)


@dataclass(frozen=True)
class Timing:
    """A repeated call's cost: the first call alone (compilation, allocator, kernel choice)
    and the steady state after warm-up."""

    first_call_seconds: float
    seconds_per_call: float


def time_calls(
    call: Callable[[], object], device: BenchDevice, *, iterations: int, warmup: int
) -> Timing:
    """Time ``call``: the first call alone, then ``warmup - 1`` more untimed calls, then
    ``iterations`` calls in one region synchronised at both ends (never inside the loop)."""
    if iterations < 1 or warmup < 1:
        raise BenchmarkError(f"Need ≥ 1 timed and ≥ 1 warm-up call, got {iterations}, {warmup}")
    device.synchronize()
    started = time.perf_counter()
    call()
    device.synchronize()
    first = time.perf_counter() - started
    for _ in range(warmup - 1):
        call()
    device.synchronize()
    started = time.perf_counter()
    for _ in range(iterations):
        call()
    device.synchronize()
    return Timing(first, (time.perf_counter() - started) / iterations)


@dataclass(frozen=True)
class MatmulPeak:
    """The FLOP/s this device reaches on one large square matmul: the denominator of MFU.
    Measured, not taken from a datasheet, so it reflects this machine's clocks and threads."""

    flops_per_second: float
    what: str

    @property
    def gflops(self) -> float:
        return self.flops_per_second / 1e9


def measure_matmul_peak(device: BenchDevice, repeats: int = 3) -> MatmulPeak:
    """Best of ``repeats`` timed rounds of a side³ matmul in the run's compute dtype."""
    side = PEAK_MATMUL_SIDE[device.type]
    dtype = device.compute_dtype
    a = torch.randn(side, side, device=device.torch_device, dtype=dtype)
    b = torch.randn(side, side, device=device.torch_device, dtype=dtype)
    products = 10 if device.type != "cpu" else 1  # a GPU product takes milliseconds
    best = min(
        time_calls(lambda: torch.mm(a, b), device, iterations=products, warmup=1).seconds_per_call
        for _ in range(repeats)
    )
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    dtype_name = str(dtype).removeprefix("torch.").replace("float", "fp").replace("bfp", "bf")
    return MatmulPeak(2 * side**3 / best, f"{dtype_name} {side}³ matmul{threads}")


def count_flops(call: Callable[[], object]) -> int:
    """FLOPs of one ``call`` as torch's FlopCounterMode counts them (matmuls, convolutions,
    attention). Attention runs through the math kernel while counting: the counter has no
    formula for the fused CPU kernel and would report its FLOPs as zero."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, the platform string elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_summary(device: BenchDevice) -> dict[str, Any]:
    """Hardware and software versions, for the head of RESULTS.md."""
    summary: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "device": device.type,
        "precision": device.precision,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": package_version("lightning"),
        "diffusers": package_version("diffusers"),
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(0).total_memory
        summary["gpu"] += f" ({memory / 2**30:.0f} GiB)"
    return summary


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    """Write a benchmark's figures for ``run_all.py`` (nothing when ``path`` is None)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2, default=_jsonable))


def _jsonable(value: object) -> object:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    raise TypeError(f"Cannot write {type(value).__name__} to JSON")


def accuracy_row(label: str, scores: dict[str, float], count: int | None = None) -> str:
    """One line of a per-attribute accuracy table, in percent."""
    shown = "  ".join(f"{name} {100 * value:5.1f}%" for name, value in scores.items())
    images = f"{count:3d} images" if count is not None else " " * 10
    return f"{label:12s} {images}  {shown}"
