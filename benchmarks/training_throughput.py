"""Training throughput and MFU: our VAE (images/s) and U-Net (latents/s) at default and demo
sizes, each beside the same-size diffusers model (``AutoencoderKL``, ``UNet2DConditionModel``).

    .venv/bin/python benchmarks/training_throughput.py [--device auto] [--precision bf16-mixed]
        [--batch-sizes 32 256] [--vae-batch-sizes 64] [--compile none] [--configs default demo]

Each figure times full optimisation steps — forward under the run's autocast, loss, backward,
AdamW (fused on CUDA and CPU, as in the device profiles) — on random inputs already on the
device, after warm-up steps, one model after the other in one process. The first step is
reported apart: with ``--compile`` it holds the compilation. FLOPs per step come from torch's
FlopCounterMode; MFU is the achieved FLOP/s over a matmul peak measured at the start of the
same run.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from report import (
    BenchDevice,
    Timing,
    add_device_arguments,
    count_flops,
    markdown_table,
    measure_matmul_peak,
    resolve_device,
    time_calls,
    write_json,
)
from torch import Tensor, nn

import ldm.config.schemas  # noqa: F401  (registers the schemas conf/*.yaml name)
from ldm.diffusion import NoiseSchedule, ScheduleConfig, diffusion_loss
from ldm.models.unet import UNet, UNetConfig
from ldm.models.vae import VAE, VAEConfig, count_parameters, vae_loss

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
CONFIG_NAMES = ("default", "demo")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
CONTEXT_TOKENS = 32  # the caption cache keeps 32 token positions (cache.text_max_positions)
KL_WEIGHT = 1e-5  # conf/train_vae.yaml loss.kl_weight
# (U-Net batches, VAE batches) per device: a GPU needs large batches to fill; a CPU is slow.
DEFAULT_BATCHES = {"cuda": ((32, 256), (64,)), "mps": ((32,), (8,)), "cpu": ((32,), (8,))}


@dataclass(frozen=True)
class ModelSizes:
    """The network configs and image size of one experiment (or the default COCO run)."""

    vae: dict[str, Any]
    unet: dict[str, Any]
    image_size: int

    @property
    def latent_side(self) -> int:
        return self.image_size // 2 ** (len(self.vae["block_channels"]) - 1)


def sizes_from_config(cfg: DictConfig) -> ModelSizes:
    model = OmegaConf.to_container(cfg.model, resolve=True)
    return ModelSizes(model["vae"], model["unet"], int(cfg.data.image_size))


def model_sizes(config_name: str) -> ModelSizes:
    overrides = [] if config_name == "default" else [f"experiment={config_name}"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return sizes_from_config(compose("train_unet", overrides))


@dataclass
class Workload:
    """One model's training step on fixed random inputs: what AdamW updates, the loss it
    minimises, and the sub-modules whose forward ``--compile`` wraps."""

    model: nn.Module
    loss: Callable[[], Tensor]
    compile_parts: tuple[nn.Module, ...]


def vae_workload(
    implementation: str, vae_cfg: dict[str, Any], image_size: int, batch: int, device: BenchDevice
) -> Workload:
    """β-VAE loss on images in [-1, 1]; encoder and decoder are compiled (the posterior draw
    between them is elementwise), the same parts for both implementations."""
    images = torch.rand(batch, 3, image_size, image_size, device=device.torch_device) * 2 - 1
    if implementation == "ours":
        vae = VAE(VAEConfig.from_dict(vae_cfg)).to(device.torch_device)

        def loss() -> Tensor:
            reconstruction, posterior = vae(images)
            return vae_loss(reconstruction, images, posterior, KL_WEIGHT)["total"]

        return Workload(vae, loss, (vae.encoder, vae.decoder))

    peer = diffusers_vae(VAEConfig.from_dict(vae_cfg), image_size).to(device.torch_device)

    def peer_loss() -> Tensor:
        posterior = peer.encode(images).latent_dist
        reconstruction = peer.decode(posterior.sample()).sample
        reconstruction_error = F.mse_loss(reconstruction.float(), images.float())
        return reconstruction_error + KL_WEIGHT * posterior.kl().float().mean()

    return Workload(peer, peer_loss, (peer.encoder, peer.decoder))


def unet_workload(
    implementation: str,
    unet_cfg: dict[str, Any],
    latent_side: int,
    batch: int,
    device: BenchDevice,
    schedule_cfg: ScheduleConfig | None = None,
) -> Workload:
    """The diffusion loss (random timesteps and noise each step) on random latents and text."""
    config = UNetConfig.from_dict(unet_cfg)
    schedule = NoiseSchedule(schedule_cfg or ScheduleConfig(), device=device.torch_device)
    z = torch.randn(batch, config.in_channels, latent_side, latent_side, device=device.type)
    context = torch.randn(batch, CONTEXT_TOKENS, config.context_dim, device=device.type)
    if implementation == "ours":
        unet = UNet(config).to(device.torch_device)
        return Workload(unet, lambda: diffusion_loss(unet, schedule, z, context).mean(), (unet,))

    peer = diffusers_unet(config, latent_side).to(device.torch_device)

    def call(x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        return peer(x, t, encoder_hidden_states=c).sample

    return Workload(peer, lambda: diffusion_loss(call, schedule, z, context).mean(), (peer,))


def diffusers_unet(config: UNetConfig, latent_side: int) -> nn.Module:
    """diffusers' U-Net with the same widths, depth, attention placement and head width."""
    from diffusers import UNet2DConditionModel

    widths = [config.model_channels * m for m in config.channel_multipliers]
    attention = [i in config.transformer_levels for i in range(len(widths))]
    return UNet2DConditionModel(
        sample_size=latent_side,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        block_out_channels=widths,
        layers_per_block=config.res_blocks_per_level,
        down_block_types=[("CrossAttnDownBlock2D" if a else "DownBlock2D") for a in attention],
        up_block_types=[("CrossAttnUpBlock2D" if a else "UpBlock2D") for a in attention[::-1]],
        cross_attention_dim=config.context_dim,
        attention_head_dim=[w // config.attention_head_dim for w in widths],
        norm_num_groups=config.norm_groups,
    )


def diffusers_vae(config: VAEConfig, image_size: int) -> nn.Module:
    """diffusers' KL autoencoder with our widths, depth and middle attention (its two extra 1×1
    quant convolutions add 92 parameters)."""
    from diffusers import AutoencoderKL

    levels = len(config.block_channels)
    return AutoencoderKL(
        in_channels=config.in_channels,
        out_channels=config.in_channels,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=list(config.block_channels),
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_groups,
        sample_size=image_size,
        mid_block_add_attention=config.mid_attention,
    )


def measure_steps(
    workload: Workload, device: BenchDevice, *, compile_mode: str, steps: int, warmup: int
) -> tuple[Timing, int]:
    """Step timing and FLOPs per step (counted on the eager model, before any compilation)."""
    model = workload.model.train()

    def forward_backward() -> None:
        with device.autocast():
            loss = workload.loss()
        loss.backward()

    flops = count_flops(forward_backward)
    model.zero_grad(set_to_none=True)
    if compile_mode != "none":
        torch.compiler.reset()  # each row pays (and reports) its own compilation
        for part in workload.compile_parts:
            part.compile(mode=None if compile_mode == "default" else compile_mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type in ("cuda", "cpu"))

    def step() -> None:
        if compile_mode != "none":
            # Tells CUDA-graph trees that a new iteration begins (reduce-overhead, max-autotune).
            torch.compiler.cudagraph_mark_step_begin()
        with device.autocast():
            loss = workload.loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return time_calls(step, device, iterations=steps, warmup=warmup), flops


@dataclass(frozen=True)
class Throughput:
    """One row: a model, an implementation, a batch size and what its steps achieved."""

    model: str  # VAE | U-Net
    implementation: str  # ours | diffusers
    config: str  # default | demo
    input: str
    batch: int
    parameters: int
    unit: str
    samples_per_second: float
    step_seconds: float
    first_step_seconds: float
    flops_per_step: int
    mfu: float


def run_row(
    model: str,
    implementation: str,
    config: str,
    sizes: ModelSizes,
    batch: int,
    device: BenchDevice,
    peak_flops: float,
    args: argparse.Namespace,
) -> Throughput:
    if model == "VAE":
        workload = vae_workload(implementation, sizes.vae, sizes.image_size, batch, device)
        shown, unit = f"{sizes.image_size}px", "images/s"
    else:
        workload = unet_workload(implementation, sizes.unet, sizes.latent_side, batch, device)
        shown, unit = f"{sizes.latent_side}×{sizes.latent_side}", "latents/s"
    timing, flops = measure_steps(
        workload, device, compile_mode=args.compile, steps=args.steps, warmup=args.warmup
    )
    row = Throughput(
        model=model,
        implementation=implementation,
        config=config,
        input=shown,
        batch=batch,
        parameters=count_parameters(workload.model),
        unit=unit,
        samples_per_second=batch / timing.seconds_per_call,
        step_seconds=timing.seconds_per_call,
        first_step_seconds=timing.first_call_seconds,
        flops_per_step=flops,
        mfu=flops / timing.seconds_per_call / peak_flops,
    )
    del workload
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def describe(row: Throughput) -> str:
    return (
        f"{row.model:5s} {row.config:7s} {row.input:>7s} batch {row.batch:3d} "
        f"{row.implementation:9s} {row.parameters:>11,d} params {row.samples_per_second:9.1f} "
        f"{row.unit}  step {1000 * row.step_seconds:8.1f} ms  first {row.first_step_seconds:6.2f} s"
        f"  {row.flops_per_step / 1e9:7.1f} GFLOP/step  MFU {100 * row.mfu:5.1f}%"
    )


def markdown_section(result: dict[str, Any]) -> str:
    """RESULTS.md section: ours beside diffusers, one line per model, size and batch."""
    rows = [Throughput(**row) for row in result["rows"]]
    pairs: dict[tuple[str, str, int], dict[str, Throughput]] = {}
    for row in rows:
        pairs.setdefault((row.model, row.config, row.batch), {})[row.implementation] = row
    lines = []
    for (model, config, batch), pair in pairs.items():
        ours, peer = pair["ours"], pair["diffusers"]
        lines.append(
            [
                model,
                f"{config} ({ours.input})",
                batch,
                f"{ours.parameters:,} / {peer.parameters:,}",
                f"**{ours.samples_per_second:,.1f}** / {peer.samples_per_second:,.1f} {ours.unit}",
                f"{ours.samples_per_second / peer.samples_per_second:.2f}",
                f"{100 * ours.mfu:.1f}% / {100 * peer.mfu:.1f}%",
                f"{ours.flops_per_step / 1e9:,.1f} / {peer.flops_per_step / 1e9:,.1f}",
                f"{ours.first_step_seconds:.2f} / {peer.first_step_seconds:.2f}",
            ]
        )
    compiled = result["compile"]
    title = "eager" if compiled == "none" else f"torch.compile mode={compiled}"
    return "\n\n".join(
        [
            f"## Training steps ({title})",
            f"Full AdamW steps on random inputs, {result['steps']} timed after "
            f"{result['warmup']} warm-up; ours / diffusers' same-size model. MFU is relative "
            f"to the measured peak ({result['peak']['flops_per_second'] / 1e9:,.0f} GFLOP/s, "
            f"{result['peak']['what']}); the first step includes any compilation.",
            markdown_table(
                [
                    "model",
                    "config",
                    "batch",
                    "parameters",
                    "throughput",
                    "ours ÷ diffusers",
                    "MFU",
                    "GFLOP/step",
                    "first step s",
                ],
                lines,
            ),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_arguments(parser)
    parser.add_argument("--configs", nargs="+", choices=CONFIG_NAMES, default=list(CONFIG_NAMES))
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="U-Net batch sizes")
    parser.add_argument("--vae-batch-sizes", type=int, nargs="+")
    parser.add_argument("--compile", choices=COMPILE_MODES, default="none")
    parser.add_argument("--steps", type=int, help="timed steps (default: 20 on CUDA, else 3)")
    parser.add_argument("--warmup", type=int, help="untimed steps (default: 3 on CUDA, else 1)")
    parser.add_argument("--json", type=Path, help="also write the figures here (for run_all)")
    args = parser.parse_args()
    device = resolve_device(parser, args)
    unet_batches, vae_batches = DEFAULT_BATCHES[device.type]
    args.batch_sizes = args.batch_sizes or list(unet_batches)
    args.vae_batch_sizes = args.vae_batch_sizes or list(vae_batches)
    args.steps = args.steps or (20 if device.type == "cuda" else 3)
    args.warmup = args.warmup or (3 if device.type == "cuda" else 1)

    print(f"torch {torch.__version__}, {device.describe()}, compile={args.compile}")
    peak = measure_matmul_peak(device)
    print(f"Measured matmul peak: {peak.gflops:,.1f} GFLOP/s ({peak.what})")
    rows = []
    for config in args.configs:
        sizes = model_sizes(config)
        for model, batches in (("VAE", args.vae_batch_sizes), ("U-Net", args.batch_sizes)):
            for batch in batches:
                for implementation in ("ours", "diffusers"):
                    row = run_row(
                        model,
                        implementation,
                        config,
                        sizes,
                        batch,
                        device,
                        peak.flops_per_second,
                        args,
                    )
                    print(describe(row), flush=True)
                    rows.append(row)
    write_json(
        args.json,
        {
            "device": device,
            "compile": args.compile,
            "steps": args.steps,
            "warmup": args.warmup,
            "peak": peak,
            "rows": [asdict(row) for row in rows],
        },
    )


if __name__ == "__main__":
    main()
