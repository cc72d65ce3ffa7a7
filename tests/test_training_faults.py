"""Faults a run survives or refuses clearly: non-finite losses (skipped, counted, K in a row
stop the run), an output directory that cannot be written or is full (refused before
training), a checkpoint write that fails (the previous last.ckpt stays whole)."""

from __future__ import annotations

import copy
import csv
import errno
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import (
    TINY_OPTIM,
    TINY_VAE_RUN,
    TinyLatentBatches,
    compose_config,
    tiny_diffusion_module,
)
from lightning.pytorch.callbacks import Callback
from test_training_step_paths import ForbidHostReadsAfterWarmup
from torch.utils.data import DataLoader

from ldm.data.dataset import batch_as_is
from ldm.runs import OutputDirectoryError
from ldm.training.checkpointing import CheckpointWriteError
from ldm.training.diffusion_module import LatentDiffusionModule
from ldm.training.fast_module import NonFiniteTrainingError
from ldm.training.step_metrics import NonFiniteSteps
from ldm.training.vae_module import VAEModule
from ldm.training.vae_stage import run_vae_stage

BATCH = 4
VAE_RUN = [
    *TINY_VAE_RUN,
    "latent_stats.max_batches=1",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=6",
    "trainer.limit_val_batches=1",
    "trainer.checkpoint_every_n_steps=2",
]


class InjectNonFinite(LatentDiffusionModule):
    """Makes the loss of chosen optimizer steps (1-based) non-finite: ``nan`` multiplies it by
    NaN (its gradients are NaN too); ``inf`` adds infinity (its gradients stay finite)."""

    inject: dict[int, str]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        how = self.inject.get(self.global_step + 1)
        if how == "nan":
            return loss * float("nan")
        if how == "inf":
            return loss + float("inf")
        return loss


def tiny_unet(inject: dict[int, str], **overrides: Any) -> InjectNonFinite:
    module = tiny_diffusion_module(
        InjectNonFinite,
        optim=TINY_OPTIM | {"lr": 1e-2, "weight_decay": 0.1},
        ema={"decay_max": 0.9},
        **overrides,
    )
    module.inject = inject
    return module


def tiny_trainer(
    steps: int, callbacks: list[Callback] | None = None, **overrides: Any
) -> L.Trainer:
    settings = {
        "accelerator": "cpu",
        "max_steps": steps,
        "gradient_clip_val": 1.0,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "callbacks": callbacks or [],
    }
    return L.Trainer(**(settings | overrides))


def fit(trainer: L.Trainer, module: LatentDiffusionModule, steps: int) -> None:
    batches = TinyLatentBatches(BATCH * steps, module.step_randomness(train=True))
    loader = DataLoader(batches, batch_size=BATCH, drop_last=True, collate_fn=batch_as_is)
    trainer.fit(module, train_dataloaders=loader)


class TrainingState:
    """Copies of the U-Net weights, AdamW's state and the EMA."""

    def __init__(self, module: LatentDiffusionModule, optimizer: torch.optim.Optimizer) -> None:
        self.weights = {k: v.clone() for k, v in module.unet.state_dict().items()}
        self.adamw = copy.deepcopy(optimizer.state_dict()["state"])
        self.ema = copy.deepcopy(module.ema)


class StateAroundStep(Callback):
    """The training state before and after optimizer step ``step`` (1-based)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.before: TrainingState | None = None
        self.after: TrainingState | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step + 1 == self.step:
            self.before = TrainingState(pl_module, trainer.optimizers[0])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.after = TrainingState(pl_module, trainer.optimizers[0])


def assert_bitwise_equal(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for key, value in expected.items():
        if isinstance(value, dict):
            assert_bitwise_equal(actual[key], value, f"{what} {key}")
        else:
            torch.testing.assert_close(actual[key], value, rtol=0, atol=0, msg=f"{what} {key}")


@pytest.mark.parametrize("fused", [True, False], ids=["fused-adamw", "unfused-adamw"])
@pytest.mark.parametrize("kind", ["nan", "inf"], ids=["nan-loss-and-gradient", "inf-loss-only"])
def test_a_nonfinite_step_leaves_weights_and_adamw_as_they_were(fused: bool, kind: str) -> None:
    """The fused optimizer skips on the device (found_inf), the unfused one on the host: both
    keep every weight, moment and step count, and the EMA averages towards the unchanged
    weights (as after a step the GradScaler skips): nothing non-finite gets in."""
    module = tiny_unet({3: kind}, fused_optimizer=fused)
    watch = StateAroundStep(3)
    fit(tiny_trainer(5, [watch]), module, steps=5)
    assert watch.before.adamw[0]["step"] == 2  # AdamW had stepped before
    assert_bitwise_equal(watch.after.weights, watch.before.weights, "weights")
    assert_bitwise_equal(watch.after.adamw, watch.before.adamw, "AdamW state")
    expected_ema = watch.before.ema
    expected_ema.update(unet_with(module, watch.before.weights))
    assert_bitwise_equal(watch.after.ema.state_dict(), expected_ema.state_dict(), "EMA")
    assert module.nonfinite_steps.read()[0] == 1
    final = module.unet.state_dict()
    assert any(not torch.equal(final[k], watch.after.weights[k]) for k in final)  # trains on
    for name, tensor in [*final.items(), *module.ema.module.state_dict().items()]:
        assert torch.isfinite(tensor).all(), name


def unet_with(module: LatentDiffusionModule, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of the module's U-Net holding ``weights``."""
    unet = copy.deepcopy(module.unet)
    unet.load_state_dict(weights)
    return unet


@pytest.mark.parametrize("fused", [True, False], ids=["fused-adamw", "unfused-adamw"])
def test_nonfinite_steps_that_are_not_consecutive_enough_do_not_stop_the_run(fused: bool) -> None:
    module = tiny_unet(
        {1: "nan", 2: "nan", 4: "nan", 5: "inf"}, fused_optimizer=fused, max_consecutive_nonfinite=3
    )
    trainer = tiny_trainer(7, log_every_n_steps=1)
    fit(trainer, module, steps=7)
    assert trainer.global_step == 7
    assert module.nonfinite_steps.read()[:2] == (4, 0)  # skipped so far, current run


def test_without_the_fused_optimizer_the_run_stops_at_the_step_that_reaches_the_limit() -> None:
    module = tiny_unet({2: "nan", 3: "nan", 4: "inf"}, max_consecutive_nonfinite=3)
    trainer = tiny_trainer(8, log_every_n_steps=100)
    with pytest.raises(NonFiniteTrainingError, match=r"steps 2 to 4 \(3 in a row"):
        fit(trainer, module, steps=8)
    assert trainer.global_step == 4


def test_with_the_fused_optimizer_the_limit_is_read_at_the_logging_cadence() -> None:
    """No GPU sync per step: the count is read every log_every_n_steps steps, and a run of
    non-finite steps that reached the limit and ended before that read still stops the run."""
    module = tiny_unet(
        {1: "nan", 2: "nan", 3: "nan"}, fused_optimizer=True, max_consecutive_nonfinite=3
    )
    trainer = tiny_trainer(8, log_every_n_steps=5)
    with pytest.raises(NonFiniteTrainingError, match=r"steps 1 to 3 \(3 in a row") as stopped:
        fit(trainer, module, steps=8)
    assert trainer.global_step == 5
    assert "No checkpoint was written yet" in str(stopped.value)


def test_the_limit_must_be_a_positive_number_of_steps_or_null() -> None:
    with pytest.raises(ValueError, match=r"max_consecutive_nonfinite must be a positive.*got 0"):
        NonFiniteSteps(0)
    assert NonFiniteSteps(None).max_consecutive is None


def nonfinite_vae_losses(monkeypatch: pytest.MonkeyPatch, steps: set[int] | range) -> None:
    """Make the VAE's loss NaN at optimizer steps ``steps`` (1-based)."""
    original = VAEModule.training_step

    def training_step(self: VAEModule, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if self.global_step + 1 in steps else loss

    monkeypatch.setattr(VAEModule, "training_step", training_step)


@pytest.mark.parametrize(("fused", "last_saved_step"), [(False, 4), (True, 6)])
def test_a_run_stuck_on_nonfinite_losses_stops_naming_the_steps_and_the_last_checkpoint(
    synthetic_overrides, tmp_path, monkeypatch, fused: bool, last_saved_step: int
) -> None:
    """The unfused optimizer reads each step's verdict and stops at step 5; the fused one (the
    CPU and CUDA profiles) reads it at the logging cadence or the epoch's end, here after the
    checkpoint of step 6. Either way the checkpoint was written during the streak and holds the
    finite weights of step 2, since skipped steps change nothing."""
    nonfinite_vae_losses(monkeypatch, range(3, 100))
    overrides = [*VAE_RUN, "trainer.max_consecutive_nonfinite=3"]
    overrides.append(f"trainer.profiles.cpu.fused_optimizer={str(fused).lower()}")
    cfg = compose_config("train_vae", [*synthetic_overrides, *overrides])
    with pytest.raises(NonFiniteTrainingError) as stopped:
        run_vae_stage(cfg, run_dir=tmp_path / "run")
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    message = str(stopped.value)
    assert "optimizer steps 3 to 5 (3 in a row, trainer.max_consecutive_nonfinite=3)" in message
    assert f"The last checkpoint written is {last} (after step {last_saved_step})" in message
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == last_saved_step
    for name, tensor in state["state_dict"].items():
        assert name.startswith("latent_") or torch.isfinite(tensor).all(), name
    assert not (tmp_path / "run" / "export").exists()


def test_skipped_steps_are_logged_and_the_loss_curve_keeps_the_good_steps(
    synthetic_overrides, tmp_path, monkeypatch
) -> None:
    nonfinite_vae_losses(monkeypatch, {3, 4})
    cfg = compose_config(
        "train_vae", [*synthetic_overrides, *VAE_RUN, "logger=csv", "trainer.log_every_n_steps=2"]
    )
    result = run_vae_stage(cfg, run_dir=tmp_path / "run")
    rows = list(csv.DictReader((result.run_dir / "csv" / "metrics.csv").open()))
    windows = [row for row in rows if row.get("train/skipped_steps")]
    assert [float(row["train/skipped_steps"]) for row in windows] == [0, 2, 2]  # steps 2, 4, 6
    assert all(row["train/total"] and row["train/total"] != "nan" for row in windows)
    assert result.export_dir.is_dir()
    state = torch.load(result.run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["nonfinite_steps"] == {"skipped": 2, "consecutive": 0}


class RecordSteps(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps += 1


def with_recorder(monkeypatch: pytest.MonkeyPatch) -> RecordSteps:
    """Adds a step recorder to the VAE stage's callbacks."""
    import ldm.training.vae_stage as stage

    recorder, original = RecordSteps(), stage._callbacks

    def callbacks(cfg, run_dir, with_logger):
        chosen, best = original(cfg, run_dir, with_logger)
        return [*chosen, recorder], best

    monkeypatch.setattr(stage, "_callbacks", callbacks)
    return recorder


def deny_writes_in(monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
    """Opening a file in ``directory`` fails as in a read-only directory (root ignores chmod)."""
    real_open = Path.open

    def open_(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self.parent == directory:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)


def test_an_unwritable_run_directory_is_refused_before_training(
    synthetic_overrides, tmp_path, monkeypatch
) -> None:
    recorder = with_recorder(monkeypatch)
    run_dir = tmp_path / "run"
    deny_writes_in(monkeypatch, run_dir)
    cfg = compose_config("train_vae", [*synthetic_overrides, *VAE_RUN])
    with pytest.raises(OutputDirectoryError, match=r"Cannot write to the run directory") as error:
        run_vae_stage(cfg, run_dir=run_dir)
    assert str(run_dir) in str(error.value) and "paths.runs_dir" in str(error.value)
    assert recorder.steps == 0


def test_an_unwritable_checkpoint_directory_is_refused_before_training(
    synthetic_overrides, tmp_path, monkeypatch
) -> None:
    recorder = with_recorder(monkeypatch)
    checkpoints = tmp_path / "run" / "checkpoints"
    deny_writes_in(monkeypatch, checkpoints)
    cfg = compose_config("train_vae", [*synthetic_overrides, *VAE_RUN])
    with pytest.raises(OutputDirectoryError, match=r"checkpoint directory .*Permission denied"):
        run_vae_stage(cfg, run_dir=tmp_path / "run")
    assert recorder.steps == 0


def test_a_disk_without_room_for_checkpoints_is_refused_before_training(
    synthetic_overrides, tmp_path, monkeypatch
) -> None:
    recorder = with_recorder(monkeypatch)
    checkpoints = tmp_path / "run" / "checkpoints"
    real_usage = shutil.disk_usage

    def nearly_full(path: Any) -> Any:
        usage = real_usage(path)
        return usage._replace(free=50_000) if Path(path) == checkpoints else usage

    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    cfg = compose_config("train_vae", [*synthetic_overrides, *VAE_RUN])
    with pytest.raises(OutputDirectoryError, match=r"Only 50 KB free in the checkpoint directory"):
        run_vae_stage(cfg, run_dir=tmp_path / "run")
    assert recorder.steps == 0


class FillsUp:
    """A file on a disk that fills up: half of the first write lands, then ENOSPC."""

    def __init__(self, file: Any) -> None:
        self.file = file

    def __enter__(self) -> FillsUp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()

    def write(self, data: Any) -> int:
        self.file.write(bytes(data[: len(data) // 2]))
        self.file.flush()
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_checkpoint_write_stops_the_run_and_keeps_the_previous_last_ckpt(
    synthetic_overrides, tmp_path, monkeypatch
) -> None:
    """The disk fills up half-way through writing last.ckpt at step 4."""
    real_open, writes = Path.open, []

    def open_(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        file = real_open(self, mode, *args, **kwargs)
        if self.name.startswith(".last.ckpt.") and "x" in mode:
            writes.append(self)
            return FillsUp(file) if len(writes) == 2 else file
        return file

    monkeypatch.setattr(Path, "open", open_)
    cfg = compose_config("train_vae", [*synthetic_overrides, *VAE_RUN])
    with pytest.raises(CheckpointWriteError, match=r"No space left on device.*previous last\.ckpt"):
        run_vae_stage(cfg, run_dir=tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 2
    assert len(writes) == 2 and not writes[1].exists(), "the half-written file is removed"


def test_with_the_fused_optimizer_skipping_and_counting_read_nothing_back() -> None:
    """The sync-free step on the CPU: the host-read trap is armed through non-finite steps."""
    trap = ForbidHostReadsAfterWarmup()
    module = tiny_unet({3: "nan", 4: "inf"}, fused_optimizer=True)
    fit(tiny_trainer(6, [trap], log_every_n_steps=1000), module, steps=6)
    assert trap.armed_steps == 4
    assert module.nonfinite_steps.read()[:2] == (2, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_nonfinite_steps_are_skipped_and_counted_without_a_host_sync() -> None:
    """The bf16 CUDA profile's step (fused AdamW, EMA): skipping and counting read nothing back."""

    class SyncsAreErrors(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            torch.cuda.set_sync_debug_mode("error" if batch_idx >= 1 else "default")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            torch.cuda.set_sync_debug_mode("default")

    module = tiny_unet({3: "nan", 4: "inf"}, fused_optimizer=True)
    watch = StateAroundStep(3)
    trainer = tiny_trainer(
        6,
        [watch, SyncsAreErrors()],
        accelerator="cuda",
        devices=1,
        precision="bf16-mixed",
        log_every_n_steps=1000,
    )
    try:
        fit(trainer, module, steps=6)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_bitwise_equal(watch.after.weights, watch.before.weights, "weights")
    assert_bitwise_equal(watch.after.adamw, watch.before.adamw, "AdamW state")
    assert module.nonfinite_steps.read()[:2] == (2, 0)
