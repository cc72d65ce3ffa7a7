"""Configuration: every config composes and passes its schema, the code's defaults agree with
the YAML, devices, loggers, run records."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from helpers import CONF_DIR, compose_config
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from ldm.config import plain
from ldm.config import schemas as s
from ldm.config.parse import dataclass_from_dict
from ldm.data.array_store import CacheConfig
from ldm.data.config import DataConfig, SplitFiles
from ldm.data.synthetic import SyntheticConfig
from ldm.devices import DeviceUnavailableError, resolve_device
from ldm.diffusion.config import ScheduleConfig
from ldm.models.dit import DiTConfig
from ldm.models.unet import UNetConfig
from ldm.models.vae import VAEConfig
from ldm.runs import start_run, wandb_offline_requested
from ldm.text.config import TextEncoderConfig
from ldm.training.loggers import build_logger

DEVICE_CHOICES = ["auto", "cpu", "cuda", "mps"]
CONFIG_NAMES = ["train_vae", "train_unet", "sample", "evaluate"]


def trainer_dict(choice: str, *extra: str) -> dict:
    cfg = compose_config("train_vae", [f"trainer={choice}", *extra])
    return OmegaConf.to_container(cfg.trainer, resolve=True)


@pytest.mark.parametrize("choice", DEVICE_CHOICES)
def test_every_device_choice_composes(choice: str) -> None:
    assert trainer_dict(choice)["device"] == choice


def group_choices(config_name: str) -> list[str]:
    """One override per option of every group the config lists (``data=synthetic``, ...)."""
    listed = OmegaConf.load(CONF_DIR / f"{config_name}.yaml").defaults
    groups = [key for entry in listed if OmegaConf.is_dict(entry) for key in entry]
    return [
        f"{group}={option.stem}"
        for group in groups
        if (CONF_DIR / group).is_dir()
        for option in sorted((CONF_DIR / group).glob("*.yaml"))
    ]


@pytest.mark.parametrize(
    ("config_name", "choice"),
    [(name, choice) for name in CONFIG_NAMES for choice in group_choices(name)],
)
def test_every_config_composes_complete_for_every_group_choice(
    config_name: str, choice: str
) -> None:
    """Composing merges every file into the schema: no key the schema lacks, no wrong type, and
    no schema key left without a value."""
    cfg = compose_config(config_name, [choice])
    assert OmegaConf.missing_keys(cfg) == set()
    assert OmegaConf.get_type(cfg.trainer) is s.TrainerSchema


@pytest.mark.parametrize("config_name", CONFIG_NAMES)
def test_each_config_is_checked_against_its_own_schema(config_name: str) -> None:
    cfg = compose_config(config_name)
    assert OmegaConf.get_type(cfg) is s.SCHEMAS_BY_STAGE[cfg.stage]


def test_a_wrong_type_is_refused_when_composing_naming_the_key_and_value() -> None:
    with pytest.raises(ConfigCompositionException, match=r"trainer\.max_epochs=many") as refused:
        compose_config("train_vae", ["trainer.max_epochs=many"])
    assert "'many' of type 'str' could not be converted to Integer" in str(refused.value.__cause__)


def test_a_key_a_yaml_file_adds_outside_the_schema_is_refused_when_composing(
    tmp_path: Path,
) -> None:
    conf = Path(shutil.copytree(CONF_DIR, tmp_path / "conf"))
    with (conf / "data" / "coco.yaml").open("a") as coco:
        coco.write("subsett: 5\n")
    with (
        initialize_config_dir(config_dir=str(conf), version_base="1.3"),
        pytest.raises(ConfigCompositionException, match=r"Key 'subsett' not in 'DataSchema'"),
    ):
        compose(config_name="train_vae")


@pytest.mark.parametrize(
    ("schema", "parsed_as"),
    [
        (s.DataSchema, DataConfig),
        (s.SplitFilesSchema, SplitFiles),
        (s.SyntheticSchema, SyntheticConfig),
        (s.VAESchema, VAEConfig),
        (s.UNetSchema, UNetConfig),
        (s.DiTSchema, DiTConfig),
        (s.DiffusionSchema, ScheduleConfig),
        (s.TextEncoderSchema, TextEncoderConfig),
        (s.CacheSchema, CacheConfig),
    ],
)
def test_each_schema_names_the_keys_its_parser_takes(schema: type, parsed_as: type) -> None:
    def names(cls: type) -> list[str]:
        return [field.name for field in dataclasses.fields(cls)]

    assert names(schema) == names(parsed_as)


@pytest.mark.parametrize(
    ("parsed_as", "section", "overrides"),
    [
        (DataConfig, "data", ["data=synthetic"]),
        (SyntheticConfig, "data.synthetic", ["data=synthetic"]),
        (VAEConfig, "model.vae", []),
        (UNetConfig, "model.unet", []),
        (DiTConfig, "model.dit", []),
        (ScheduleConfig, "diffusion", []),
        (TextEncoderConfig, "text_encoder", []),
        (CacheConfig, "cache", []),
    ],
)
def test_the_code_defaults_are_the_yaml_values(parsed_as: type, section: str, overrides) -> None:
    """Code that builds a config without the YAML (tests, exports of older runs) gets the real
    run's values, not others."""
    node = OmegaConf.select(compose_config("train_unet", overrides), section)
    from_yaml = dataclass_from_dict(parsed_as, plain(node), section)
    for field in dataclasses.fields(parsed_as):
        if field.default is not dataclasses.MISSING:
            assert getattr(from_yaml, field.name) == field.default, field.name
        elif field.default_factory is not dataclasses.MISSING:
            assert getattr(from_yaml, field.name) == field.default_factory(), field.name


def test_demo_experiment_selects_the_embedded_data_and_small_models() -> None:
    cfg = compose_config("train_vae", ["experiment=demo"])
    default = compose_config("train_vae")
    assert cfg.data.source == "synthetic"
    assert sum(cfg.model.vae.block_channels) < sum(default.model.vae.block_channels)


@pytest.mark.parametrize("config_name", CONFIG_NAMES)
def test_an_experiment_also_sets_what_only_one_script_has(config_name: str) -> None:
    """experiment=demo reads conf/experiment/demo.yaml and conf/experiment/<script>/demo.yaml."""
    part = OmegaConf.load(CONF_DIR / "experiment" / config_name / "demo.yaml")
    cfg = compose_config(config_name, ["experiment=demo"])
    for key, value in leaves(OmegaConf.to_container(part)):
        assert OmegaConf.select(cfg, key) == value, key


def leaves(values: dict, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, value) of every non-mapping value in ``values``."""
    found = []
    for name, value in values.items():
        if isinstance(value, dict):
            found.extend(leaves(value, f"{prefix}{name}."))
        else:
            found.append((f"{prefix}{name}", value))
    return found


def test_a_command_line_override_wins_over_the_experiment() -> None:
    cfg = compose_config("sample", ["experiment=demo", "steps=3"])
    assert cfg.steps == 3


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
