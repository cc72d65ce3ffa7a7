"""The fast training step: no host reads of device values, compiled = eager, metric windows."""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Iterator
from typing import Any

import lightning as L
import pytest
import torch
from helpers import (
    TINY_CONTEXT,
    TINY_LATENT_SHAPE,
    TINY_OPTIM,
    TinyLatentBatches,
    tiny_diffusion_module,
)
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from ldm.data.dataset import batch_as_is
from ldm.devices import resolve_device
from ldm.training.callbacks import ThroughputLogger
from ldm.training.diffusion_module import LatentDiffusionModule
from ldm.training.optim import build_optimizer
from ldm.training.step_metrics import MetricWindow

BATCH = 4
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


class HostReadError(AssertionError):
    """A training step read a tensor's value on the host (a GPU sync on CUDA)."""


@contextlib.contextmanager
def host_reads_forbidden() -> Iterator[None]:
    """Make every way of reading a tensor's value back to the host raise."""
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def forbid(name: str) -> Any:
        def raising(*args: Any, **kwargs: Any) -> Any:
            raise HostReadError(f"Tensor.{name} called inside the training step")

        return raising

    for name in HOST_READS:
        setattr(torch.Tensor, name, forbid(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def tiny_module(**overrides: Any) -> LatentDiffusionModule:
    return tiny_diffusion_module(diffusion={"loss_weighting": "min_snr"}, **overrides)


class ForbidHostReadsAfterWarmup(Callback):
    """Arms the trap from the start of each batch after the first two to the end of it
    (callbacks' ``on_train_batch_end`` run before the module's logging hook)."""

    def __init__(self) -> None:
        self.armed_steps = 0
        self._trap: contextlib.ExitStack | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx >= 2:
            self._trap = contextlib.ExitStack()
            self._trap.enter_context(host_reads_forbidden())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._trap is not None:
            self._disarm()
            self.armed_steps += 1

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self._trap is not None:  # before Lightning's teardown moves the model to the CPU
            self._disarm()

    def _disarm(self) -> None:
        self._trap.close()
        self._trap = None


def fit_tiny(module: LatentDiffusionModule, callbacks: list[Callback], steps: int = 5) -> None:
    loader = DataLoader(
        TinyLatentBatches(BATCH * steps, module.step_randomness(train=True)),
        batch_size=BATCH,
        drop_last=True,
        collate_fn=batch_as_is,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        gradient_clip_val=1.0,
        log_every_n_steps=1000,  # the armed steps are not logging steps
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=True,
        callbacks=callbacks,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=loader)


@pytest.mark.parametrize(
    "diffusion",
    [
        {"loss_weighting": "min_snr"},
        {"objective": "flow_matching", "noise_offset": 0.1, "input_perturbation": 0.1},
    ],
    ids=["ddpm_min_snr", "flow_matching_with_noise_options"],
)
def test_the_unet_training_step_reads_nothing_back_from_the_device(diffusion) -> None:
    """Forward, loss, backward, clipping, fused AdamW, EMA and LR schedule: nothing of it may
    read a tensor's value on the host, or a GPU would wait for the queue every step."""
    trap = ForbidHostReadsAfterWarmup()
    fit_tiny(tiny_diffusion_module(diffusion=diffusion, fused_optimizer=True), [trap])
    assert trap.armed_steps == 3


def test_the_trap_catches_a_step_that_reads_a_value() -> None:
    class Chatty(LatentDiffusionModule):
        def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            if loss > 100:  # bool(tensor): a sync
                raise RuntimeError("unreachable")
            return loss

    torch.manual_seed(0)
    chatty = Chatty(**tiny_module().hparams)
    with pytest.raises(HostReadError, match="__bool__"):
        fit_tiny(chatty, [ForbidHostReadsAfterWarmup()])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_unet_training_step_makes_no_cuda_sync() -> None:
    class SyncsAreErrors(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            torch.cuda.set_sync_debug_mode("error" if batch_idx >= 2 else "default")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            torch.cuda.set_sync_debug_mode("default")

    module = tiny_module(fused_optimizer=True)
    loader = DataLoader(
        TinyLatentBatches(BATCH * 5, module.step_randomness(train=True)),
        batch_size=BATCH,
        drop_last=True,
        collate_fn=batch_as_is,
        pin_memory=True,
    )
    trainer = L.Trainer(
        accelerator="cuda",
        devices=1,
        precision="bf16-mixed",
        max_steps=5,
        gradient_clip_val=1.0,
        log_every_n_steps=1000,
        logger=False,
        enable_checkpointing=False,
        callbacks=[SyncsAreErrors()],
        num_sanity_val_steps=0,
    )
    try:
        trainer.fit(module, train_dataloaders=loader)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_the_compiled_training_loss_equals_the_eager_one_with_its_gradients() -> None:
    eager, compiled = tiny_module(), tiny_module(compile_mode="default")
    drawn = eager.step_randomness(train=True).draw(BATCH, torch.Generator().manual_seed(0))
    inputs = (
        torch.randn(BATCH, *TINY_LATENT_SHAPE).half(),
        torch.rand(BATCH, *TINY_LATENT_SHAPE).half(),
        drawn["posterior_noise"],
        torch.randn(BATCH, *TINY_CONTEXT).half(),
        drawn["drop_condition"],
        drawn["timesteps"],
        drawn["diffusion_noise"],
    )
    losses = [module._training_losses(*inputs) for module in (eager, compiled)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    for loss in losses:
        loss.mean().backward()
    for (name, ours), theirs in zip(
        eager.unet.named_parameters(), compiled.unet.parameters(), strict=True
    ):
        torch.testing.assert_close(theirs.grad, ours.grad, rtol=1e-3, atol=1e-6, msg=name)


def test_a_metric_window_averages_over_the_samples_each_bucket_got() -> None:
    window = MetricWindow()
    window.add("loss", torch.tensor(2.0))
    window.add("loss", torch.tensor(4.0))
    window.add(("a", "b", "c"), torch.tensor([3.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 0.0]))
    window.add(("a", "b", "c"), torch.tensor([3.0, 8.0, 0.0]), torch.tensor([2.0, 4.0, 0.0]))
    means = window.read_means()
    assert means["loss"] == 3.0 and means["a"] == 2.0 and means["b"] == 2.0
    assert torch.isnan(means["c"])  # no samples: dropped by the caller
    assert all(value.device.type == "cpu" for value in means.values())
    assert not window  # reading starts a new window


def test_fused_adamw_is_what_the_profile_asks_for() -> None:
    parameters = [torch.nn.Parameter(torch.zeros(3))]
    assert build_optimizer(parameters, TINY_OPTIM, 10, fused=True)["optimizer"].defaults["fused"]
    assert not build_optimizer(parameters, TINY_OPTIM, 10)["optimizer"].defaults["fused"]


def test_device_profiles_carry_the_speed_switches_and_check_the_compile_mode() -> None:
    profile = {
        "precision": "32-true",
        "num_workers": 0,
        "pin_memory": False,
        "persistent_workers": False,
        "tf32": False,
        "cudnn_benchmark": False,
        "channels_last": False,
    }
    trainer_cfg = {
        "device": "cpu",
        "precision": None,
        "num_workers": None,
        "compile": None,
        "profiles": {"cpu": profile | {"compile": "none", "fused_optimizer": True}},
    }
    settings = resolve_device(trainer_cfg)
    assert settings.fused_optimizer and settings.compile_mode == "none"
    assert resolve_device(trainer_cfg | {"compile": "max-autotune"}).compile_mode == "max-autotune"
    with pytest.raises(ValueError, match=r"trainer\.compile must be one of"):
        resolve_device(trainer_cfg | {"compile": "fast"})


def test_throughput_is_logged_per_window_without_the_validation_time(tmp_path) -> None:
    """A fake clock: each training step takes 1 s and each validation 1000 s, so every window
    shows exactly 4 samples/s unless validation time leaks into it."""
    clock = {"now": 0.0}

    class TimedSteps(LatentDiffusionModule):
        def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
            clock["now"] += 1.0
            return super().training_step(batch, batch_idx)

        def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
            clock["now"] += 1000.0

    torch.manual_seed(0)
    module = TimedSteps(**tiny_module().hparams)
    batches = TinyLatentBatches(BATCH * 4, module.step_randomness(train=True))
    loader = DataLoader(batches, batch_size=BATCH, drop_last=True, collate_fn=batch_as_is)
    val_loader = DataLoader(
        TinyLatentBatches(BATCH, module.step_randomness(train=False)),
        batch_size=BATCH,
        collate_fn=batch_as_is,
    )
    throughput = ThroughputLogger(lambda batch: len(batch["index"]), clock=lambda: clock["now"])
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=3,
        log_every_n_steps=3,
        logger=CSVLogger(tmp_path, name="csv", version=""),
        enable_checkpointing=False,
        callbacks=[throughput],
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=val_loader)
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    first_step = [float(r["perf/first_step_seconds"]) for r in rows if r["perf/first_step_seconds"]]
    rates = [float(r["perf/samples_per_second"]) for r in rows if r["perf/samples_per_second"]]
    assert first_step == [1.0]
    assert rates == [BATCH / 1.0] * 4  # steps 3, 6, 9, 12 of 12; windows span two validations
