"""Configuration: composition for every device, struct mode, defaults, loggers, run records."""

from __future__ import annotations

import pytest
import torch
from helpers import compose_config
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from ldm.devices import DeviceUnavailableError, resolve_device
from ldm.runs import start_run, wandb_offline_requested
from ldm.training.loggers import build_logger

DEVICE_CHOICES = ["auto", "cpu", "cuda", "mps"]


def trainer_dict(choice: str, *extra: str) -> dict:
    cfg = compose_config("train_vae", [f"trainer={choice}", *extra])
    return OmegaConf.to_container(cfg.trainer, resolve=True)


@pytest.mark.parametrize("choice", DEVICE_CHOICES)
def test_every_device_choice_composes(choice: str) -> None:
    assert trainer_dict(choice)["device"] == choice


def test_defaults_describe_the_real_coco_run() -> None:
    cfg = compose_config("train_vae")
    assert cfg.data.source == "coco"
    assert cfg.data.image_size == 128
    assert cfg.data.batch_size == 32
    assert cfg.trainer.max_epochs == 15
    assert cfg.trainer.device == "auto"
    assert cfg.logger.kind == "wandb"


def test_demo_experiment_selects_the_embedded_data_and_small_models() -> None:
    cfg = compose_config("train_vae", ["experiment=demo"])
    default = compose_config("train_vae")
    assert cfg.data.source == "synthetic"
    assert sum(cfg.model.vae.block_channels) < sum(default.model.vae.block_channels)


def test_mistyped_key_fails_with_hydras_message() -> None:
    with pytest.raises(ConfigCompositionException, match="max_epoch"):
        compose_config("train_vae", ["trainer.max_epoch=3"])


def test_cpu_uses_full_precision_without_pinning() -> None:
    settings = resolve_device(trainer_dict("cpu"))
    assert settings.device == "cpu"
    assert settings.precision == "32-true"
    assert settings.loader.pin_memory is False


def test_auto_picks_cpu_when_nothing_else_is_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("ldm.devices.mps_available", lambda: False)
    assert resolve_device(trainer_dict("auto")).device == "cpu"


def test_auto_prefers_cuda_with_bf16_and_pinned_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    settings = resolve_device(trainer_dict("auto"))
    assert (settings.device, settings.precision, settings.loader.pin_memory) == (
        "cuda",
        "bf16-mixed",
        True,
    )


def test_auto_picks_mps_before_cpu_in_full_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("ldm.devices.mps_available", lambda: True)
    settings = resolve_device(trainer_dict("auto"))
    assert (settings.device, settings.precision, settings.loader.pin_memory) == (
        "mps",
        "32-true",
        False,
    )


def test_cuda_without_bf16_falls_back_to_fp16_mixed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_device(trainer_dict("cuda")).precision == "16-mixed"


@pytest.mark.parametrize("choice", ["cuda", "mps"])
def test_absent_explicit_device_fails_clearly(choice: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("ldm.devices.mps_available", lambda: False)
    with pytest.raises(DeviceUnavailableError, match=rf"trainer={choice}.*trainer=auto"):
        resolve_device(trainer_dict(choice))


def test_explicit_precision_and_workers_override_the_profile() -> None:
    settings = resolve_device(
        trainer_dict("cpu", "trainer.precision=bf16-mixed", "trainer.num_workers=0")
    )
    assert settings.precision == "bf16-mixed"
    assert settings.loader.num_workers == 0


def test_wandb_offline_comes_from_config_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert not wandb_offline_requested({"offline": False})
    assert wandb_offline_requested({"offline": True})
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_offline_requested({"offline": False})


@pytest.mark.parametrize(("choice", "expected"), [("csv", "CSVLogger"), ("none", None)])
def test_logger_choices_build(choice: str, expected: str | None, tmp_path) -> None:
    cfg = compose_config("train_vae", [f"logger={choice}"])
    logger = build_logger(OmegaConf.to_container(cfg.logger), tmp_path)
    assert (type(logger).__name__ if logger else None) == expected


def test_wandb_logger_records_offline_into_the_run_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_config("train_vae")
    logger = build_logger(OmegaConf.to_container(cfg.logger), tmp_path)
    logger.log_metrics({"probe": 1.0}, step=0)
    logger.experiment.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_start_run_writes_the_resolved_config_and_seeds(tmp_path) -> None:
    cfg = compose_config("train_vae", ["trainer=cpu", "seed=7", f"paths.root_dir={tmp_path}"])
    context = start_run(cfg, run_dir=tmp_path / "run")
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "${" not in saved
    assert OmegaConf.create(saved).data.root == f"{tmp_path}/data/coco"
    first = torch.rand(3)
    start_run(cfg, run_dir=tmp_path / "run")
    assert torch.equal(first, torch.rand(3))
    assert context.seed == 7
