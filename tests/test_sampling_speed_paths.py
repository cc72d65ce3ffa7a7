"""Sampling's fast paths against the plain one: a loop that never waits on the device, a
compiled U-Net that samples like the eager one, and padded batches that change no image."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator

import pytest
import torch
from helpers import compose_config
from torch import Tensor, nn

from ldm.diffusion import NoiseSchedule, ScheduleConfig, sample
from ldm.latent_norm import LatentNormalizer
from ldm.models.vae import VAE, VAEConfig
from ldm.pipeline import COMPILE_MODES, LatentDiffusionPipeline, SamplingOptions
from ldm.sampling import SamplingError, request_from_config

# What reads a tensor's value back into Python; on a CUDA tensor each waits for the device.
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
CONTEXT_DIM, CONTEXT_LENGTH = 32, 8
LATENT_SHAPE = (4, 8, 8)
NUM_TIMESTEPS = 50

# (sampler, eta, schedule): each sampler's own maths, the stochastic paths (DDPM, DDIM with eta)
# and zero terminal SNR, where DPM-Solver's log-SNR is -∞ at the first step.
LOOP_CASES = {
    "ddpm": (
        "ddpm",
        0.0,
        ScheduleConfig(prediction_type="epsilon", rescale_zero_terminal_snr=False),
    ),
    "ddim": (
        "ddim",
        0.0,
        ScheduleConfig(prediction_type="epsilon", rescale_zero_terminal_snr=False),
    ),
    "ddim_eta": (
        "ddim",
        1.0,
        ScheduleConfig(prediction_type="epsilon", rescale_zero_terminal_snr=False),
    ),
    "dpmpp_2m_zero_snr": (
        "dpmpp_2m",
        0.0,
        ScheduleConfig(prediction_type="v_prediction", rescale_zero_terminal_snr=True),
    ),
}


class HostReadTrap:
    """Once armed, every host read of a tensor's value raises instead of returning it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.armed = False
        for name in HOST_READS:
            monkeypatch.setattr(
                torch.Tensor, name, self._guarded(name, getattr(torch.Tensor, name))
            )

    def _guarded(self, name: str, read: Callable) -> Callable:
        def guarded(tensor: Tensor, *args, **kwargs):
            if self.armed:
                raise AssertionError(
                    f"Tensor.{name} read a value back to the host inside the sampling loop; on "
                    "CUDA that stalls every step. Keep scalars as Python numbers (see "
                    "NoiseSchedule's host copy)."
                )
            return read(tensor, *args, **kwargs)

        return guarded


class TensorOnlyDenoiser:
    """A conditional denoiser of device arithmetic only; arms ``trap`` on its first call, so what
    ``sample`` does before the loop (reading the CPU timesteps once) stays allowed."""

    def __init__(self, trap: HostReadTrap | None = None) -> None:
        self.trap, self.calls = trap, 0

    def __call__(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        if self.trap is not None:
            self.trap.armed = True
        self.calls += 1
        time_shift = 1e-3 * t.to(x_t.dtype).reshape(-1, 1, 1, 1)
        return 0.1 * x_t + cond.mean(dim=(1, 2)).reshape(-1, 1, 1, 1) + time_shift


@pytest.fixture
def trap(monkeypatch: pytest.MonkeyPatch) -> Iterator[HostReadTrap]:
    host_reads = HostReadTrap(monkeypatch)
    yield host_reads
    host_reads.armed = False


def guided_sample(model: TensorOnlyDenoiser, sampler: str, eta: float, config: ScheduleConfig):
    batch = 3
    generators = [torch.Generator().manual_seed(seed) for seed in range(batch)]
    return sample(
        model,
        NoiseSchedule(config),
        sampler,
        steps=6,
        cond=torch.randn(batch, CONTEXT_LENGTH, CONTEXT_DIM),
        uncond=torch.zeros(batch, CONTEXT_LENGTH, CONTEXT_DIM),
        cfg_scale=7.5,
        eta=eta,
        shape=(batch, *LATENT_SHAPE),
        generator=generators,
    )


# ---- no host reads inside the loop ------------------------------------------------------------


@pytest.mark.parametrize(("sampler", "eta", "config"), LOOP_CASES.values(), ids=LOOP_CASES.keys())
def test_sampling_loop_never_reads_a_tensor_value_back(trap, sampler, eta, config) -> None:
    model = TensorOnlyDenoiser(trap)

    try:
        x = guided_sample(model, sampler, eta, config)
    finally:
        trap.armed = False

    assert model.calls == 6
    assert torch.isfinite(x).all()


def test_img2img_loop_never_reads_a_tensor_value_back(trap) -> None:
    model = TensorOnlyDenoiser(trap)

    try:
        sample(
            model,
            NoiseSchedule(),
            "dpmpp_2m",
            steps=10,
            cond=torch.randn(2, CONTEXT_LENGTH, CONTEXT_DIM),
            init_latent=torch.randn(2, *LATENT_SHAPE),
            strength=0.5,
            generator=torch.Generator().manual_seed(0),
        )
    finally:
        trap.armed = False

    assert model.calls == 5


def test_the_trap_catches_a_host_read_inside_the_loop(trap) -> None:
    """The check above can fail: a denoiser that reads a value back is caught."""

    class ReadingDenoiser(TensorOnlyDenoiser):
        def __call__(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
            output = super().__call__(x_t, t, cond)
            return output * float(t[0])

    with pytest.raises(AssertionError, match=r"Tensor\.__float__ read a value back"):
        try:
            guided_sample(
                ReadingDenoiser(trap),
                "ddim",
                0.0,
                ScheduleConfig(prediction_type="epsilon", rescale_zero_terminal_snr=False),
            )
        finally:
            trap.armed = False


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs CUDA: torch.cuda.set_sync_debug_mode checks only CUDA synchronisations",
)
@pytest.mark.parametrize(("sampler", "eta", "config"), LOOP_CASES.values(), ids=LOOP_CASES.keys())
def test_sampling_loop_never_synchronises_with_the_cuda_device(sampler, eta, config) -> None:
    device, batch = torch.device("cuda"), 4
    schedule = NoiseSchedule(config, device=device)
    cond = torch.randn(batch, CONTEXT_LENGTH, CONTEXT_DIM, device=device)
    uncond = torch.zeros_like(cond)
    generators = [torch.Generator(device).manual_seed(seed) for seed in range(batch)]
    torch.cuda.synchronize()

    torch.cuda.set_sync_debug_mode("error")
    try:
        x = sample(
            TensorOnlyDenoiser(),
            schedule,
            sampler,
            steps=10,
            cond=cond,
            uncond=uncond,
            cfg_scale=7.5,
            eta=eta,
            shape=(batch, *LATENT_SHAPE),
            generator=generators,
        )
    finally:
        torch.cuda.set_sync_debug_mode("default")

    assert torch.isfinite(x).all()


# ---- a compiled U-Net and fixed batches --------------------------------------------------------


class TinyUNet(nn.Module):
    """The U-Net's call signature around two convolutions: inductor compiles it in seconds on the
    CPU, where the smallest real U-Net takes about a minute."""

    def __init__(self) -> None:
        super().__init__()
        channels = LATENT_SHAPE[0]
        self.conv_in = nn.Conv2d(channels, 8, 3, padding=1)
        self.context_proj = nn.Linear(CONTEXT_DIM, 8)
        self.conv_out = nn.Conv2d(8, channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        hidden = self.conv_in(x) + self.context_proj(context.mean(dim=1))[:, :, None, None]
        hidden = nn.functional.silu(hidden) + (t.to(x.dtype) / NUM_TIMESTEPS)[:, None, None, None]
        return self.conv_out(hidden)


def tiny_pipeline(**speed_options) -> LatentDiffusionPipeline:
    torch.manual_seed(0)
    return LatentDiffusionPipeline(
        unet=TinyUNet().eval(),
        vae=VAE(VAEConfig(block_channels=(8, 8), layers_per_block=1, norm_groups=4)).eval(),
        text_encoder=None,
        schedule=NoiseSchedule(
            ScheduleConfig(
                num_train_timesteps=NUM_TIMESTEPS,
                prediction_type="epsilon",
                rescale_zero_terminal_snr=False,
            )
        ),
        latent_normalizer=LatentNormalizer.global_scale(1.0),
        latent_shape=LATENT_SHAPE,
        context_length=CONTEXT_LENGTH,
        **speed_options,
    )


def text_context(batch: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (
        torch.randn(batch, CONTEXT_LENGTH, CONTEXT_DIM, generator=generator),
        torch.randn(1, CONTEXT_LENGTH, CONTEXT_DIM, generator=generator),
    )


def recorded_batch_sizes(pipeline: LatentDiffusionPipeline) -> list[int]:
    sizes: list[int] = []
    pipeline.unet.register_forward_pre_hook(lambda module, inputs: sizes.append(len(inputs[0])))
    return sizes


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    """Compiled code is cached per function; start and leave each compiling test with none."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None,
    reason="inductor compiles CPU kernels with a C++ compiler (g++, or $CXX), and none is here",
)
def test_compiled_unet_samples_like_the_eager_one_and_is_traced_once(fresh_dynamo) -> None:
    options = SamplingOptions(sampler="ddpm", steps=4, cfg_scale=3.0)
    context, uncond = text_context(4)
    eager = tiny_pipeline().generate_from_context(context[:3], uncond, [7, 8, 9], options)
    compiled_pipeline = tiny_pipeline(compile_mode="default", fixed_batch_size=4)

    compiled = compiled_pipeline.generate_from_context(context[:3], uncond, [7, 8, 9], options)
    with torch._dynamo.config.patch(error_on_recompile=True):  # the padded shape is the full one
        compiled_pipeline.generate_from_context(context, uncond, [7, 8, 9, 10], options)

    assert compiled_pipeline.denoiser is not compiled_pipeline.unet
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-4)  # fused kernels may round


@pytest.mark.parametrize("img2img", [False, True], ids=["text_to_image", "img2img"])
def test_padding_a_partial_batch_changes_none_of_its_images(img2img: bool) -> None:
    strength = 0.6 if img2img else 1.0
    options = SamplingOptions(sampler="ddpm", steps=5, cfg_scale=3.0, strength=strength)
    context, uncond = text_context(3)
    init_latents = torch.randn(3, *LATENT_SHAPE) if img2img else None
    padded_pipeline = tiny_pipeline(fixed_batch_size=5)
    batch_sizes = recorded_batch_sizes(padded_pipeline)

    unpadded = tiny_pipeline().generate_from_context(
        context, uncond, [4, 5, 6], options, init_latents=init_latents
    )
    padded = padded_pipeline.generate_from_context(
        context, uncond, [4, 5, 6], options, init_latents=init_latents
    )

    assert set(batch_sizes) == {10}  # 5 images, both guidance branches in one call
    assert padded.shape == unpadded.shape
    torch.testing.assert_close(padded, unpadded, rtol=0, atol=1e-4)  # batch size may round


def test_full_batches_are_not_padded() -> None:
    pipeline = tiny_pipeline(fixed_batch_size=2)
    batch_sizes = recorded_batch_sizes(pipeline)
    context, uncond = text_context(3)

    images = pipeline.generate_from_context(
        context, uncond, [1, 2, 3], SamplingOptions(steps=2, cfg_scale=1.0)
    )

    assert batch_sizes == [3, 3] and images.shape[0] == 3


# ---- the compile option at the boundary ------------------------------------------------------


DDPM = ScheduleConfig()  # the checkpoint's diffusion config: T = 200, the most sampling steps


def sample_request_cfg(*overrides: str):
    return compose_config("sample", ["prompt='a red circle'", *overrides])


def test_compile_is_off_unless_asked_for() -> None:
    assert request_from_config(sample_request_cfg(), DDPM).compile_mode == "none"


@pytest.mark.parametrize("mode", COMPILE_MODES)
def test_every_compile_mode_is_accepted(mode: str) -> None:
    assert request_from_config(sample_request_cfg(f"compile={mode}"), DDPM).compile_mode == mode


def test_unknown_compile_mode_is_refused_naming_the_valid_ones() -> None:
    with pytest.raises(SamplingError) as error:
        request_from_config(sample_request_cfg("compile=bogus"), DDPM)

    assert str(error.value) == (
        "compile='bogus' is not supported; choose one of none, default, reduce-overhead, "
        "max-autotune."
    )


@pytest.mark.parametrize(("n", "batch_size", "full"), [(10, 4, 4), (3, 8, 3)])
def test_full_batch_size_is_the_size_of_every_batch_but_the_last(n, batch_size, full) -> None:
    request = request_from_config(sample_request_cfg(f"n={n}", f"batch_size={batch_size}"), DDPM)

    assert request.full_batch_size == full
    assert all(len(batch) <= full for batch in request.batches())
