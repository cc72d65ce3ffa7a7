"""A bad configuration fails before any training, with one message: what, the value, the fix.

Every case goes through the entry point a user hits (``run_vae_stage`` / ``run_unet_stage`` on
the config composed as ``train_*.py`` composes it).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CONF_DIR, SMALL_SYNTHETIC, compose_config
from hydra import compose, initialize_config_dir

from ldm.config.checks import ConfigCheck
from ldm.config.command_line import refuse_null_config_groups
from ldm.config.keys import UnknownConfigKeyError
from ldm.data.array_store import CacheConfig
from ldm.data.config import DataConfig
from ldm.devices import DeviceUnavailableError
from ldm.diffusion.config import ScheduleConfig
from ldm.exports import UNetExport, save_unet_export, save_vae_export
from ldm.models.unet import UNet, UNetConfig
from ldm.models.vae import VAE, VAEConfig
from ldm.text.config import TextEncoderConfig
from ldm.training.unet_stage import run_unet_stage
from ldm.training.vae_stage import run_vae_stage

IMAGE_SIZE_PX = 32
VAE_TINY = [
    "experiment=demo",
    f"data.image_size={IMAGE_SIZE_PX}",
    "data.batch_size=4",
    "model.vae.block_channels=[16,32]",
    "model.vae.norm_groups=8",
    "debug=fdr",  # one batch, no logger: a check that failed to refuse costs seconds
]
UNET_TINY = [
    "experiment=demo",
    "model.denoiser=unet",  # the demo trains a DiT; these runs a tiny U-Net
    f"data.image_size={IMAGE_SIZE_PX}",
    "data.batch_size=8",
    "model.unet.model_channels=16",
    "model.unet.channel_multipliers=[1,2]",
    "model.unet.transformer_levels=[1]",
    "model.unet.norm_groups=8",
    "model.unet.attention_head_dim=16",
    "debug=fdr",  # one batch, no logger: a check that failed to refuse costs seconds
]
TINY_UNET_CONFIG = UNetConfig(
    model_channels=16,
    channel_multipliers=(1, 2),
    transformer_levels=(1,),
    norm_groups=8,
    attention_head_dim=16,
)
SYNTHETIC_DATA = {
    "source": "synthetic",
    "root": "data/synthetic",
    "train": {"annotations": "a.json", "images": "train"},
    "val": None,
    "val_fraction": 0.1,
}
STATS = {
    "channel_mean": [0.0] * 4,
    "channel_std": [1.0] * 4,
    "global_mean": 0.0,
    "global_std": 2.0,
    "scale_factor": 0.5,
    "num_latents": 8,
    "sampled_posterior": True,
}


@pytest.fixture(scope="module")
def vae_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny VAE exported as train_vae.py would, for 32px images (4×16×16 latents)."""
    vae = VAE(VAEConfig(block_channels=(16, 32), layers_per_block=1, norm_groups=8))
    directory = tmp_path_factory.mktemp("vae") / "runs" / "vae" / "run1" / "export"
    return save_vae_export(directory, vae, latent_stats=STATS, extra={"image_size": IMAGE_SIZE_PX})


@pytest.fixture(scope="module")
def unet_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny U-Net export where a VAE export belongs: ``runs/unet/<run>/export``."""
    unet = UNet(TINY_UNET_CONFIG)
    directory = tmp_path_factory.mktemp("unet") / "runs" / "unet" / "run1" / "export"
    return save_unet_export(directory, UNetExport.from_models(raw=unet, ema=unet, description={}))


def run_vae(overrides: list[str], *extra: str, run_dir: Path) -> None:
    run_vae_stage(compose_config("train_vae", [*VAE_TINY, *overrides, *extra]), run_dir=run_dir)


def run_unet(overrides: list[str], vae_export: Path, *extra: str, run_dir: Path) -> None:
    cfg = compose_config("train_unet", [*UNET_TINY, *overrides, f"vae_export={vae_export}", *extra])
    run_unet_stage(cfg, run_dir=run_dir)


# ---- mistyped keys ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("+optim.lrr=1e-3", r"optim\.lrr=0\.001: did you mean optim\.lr\?"),
        ("+trainer.max_epoch=3", r"trainer\.max_epoch=3: did you mean trainer\.max_epochs\?"),
        ("+data.subsett=5", r"data\.subsett=5: did you mean data\.subset\?"),
        ("+model.vae.layers_per_blok=2", r"did you mean model\.vae\.layers_per_block\?"),
        ("+seeed=3", r"seeed=3: did you mean seed\?"),
        ("+optim.momentum=0.9", r"optim\.momentum=0\.9: optim has only betas, lr, "),
    ],
)
def test_a_key_added_with_a_typo_is_refused_with_its_close_match(
    synthetic_overrides: list[str], tmp_path: Path, override: str, expected: str
) -> None:
    """Hydra refuses a mistyped key by itself, but accepts it with '+' (its own error message
    even suggests that): the run would then silently keep the default."""
    with pytest.raises(UnknownConfigKeyError, match=expected):
        run_vae(synthetic_overrides, override, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("+cond_dropot=0.2", r"cond_dropot=0\.2: did you mean cond_dropout\?"),
        ("+ema.decay=0.99", r"ema\.decay=0\.99: did you mean ema\.decay_max\?"),
        ("+diffusion.beta_schedul=cosine", r"did you mean diffusion\.beta_schedule\?"),
        ("+cache.polcy=error", r"cache\.polcy='error': did you mean cache\.policy\?"),
    ],
)
def test_a_unet_key_added_with_a_typo_is_refused_before_the_vae_is_read(
    synthetic_overrides: list[str], tmp_path: Path, override: str, expected: str
) -> None:
    with pytest.raises(UnknownConfigKeyError, match=expected):
        run_unet(synthetic_overrides, tmp_path / "no-vae-here", override, run_dir=tmp_path / "r")


def test_every_unknown_key_is_named_in_the_one_message(
    synthetic_overrides: list[str], tmp_path: Path
) -> None:
    with pytest.raises(UnknownConfigKeyError) as refused:
        run_vae(synthetic_overrides, "+optim.lrr=1e-3", "+loss.kl_weigth=0", run_dir=tmp_path)
    assert "optim.lrr" in str(refused.value) and "loss.kl_weigth" in str(refused.value)


@pytest.mark.parametrize(
    ("config_name", "override", "expected"),
    [
        ("sample", "+stepz=3", r"stepz=3: did you mean steps\?"),
        ("evaluate", "+fid.feature_dims=64", r"did you mean fid\.feature_dim\?"),
    ],
)
def test_every_entry_script_refuses_an_added_key_before_its_run_starts(
    tmp_path: Path, config_name: str, override: str, expected: str
) -> None:
    """The check Hydra runs first (conf/*.yaml hydra.callbacks), with one message, no traceback."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, [override, f"out_dir={tmp_path}"], return_hydra_config=True)
    with pytest.raises(SystemExit, match=expected):
        ConfigCheck().on_run_start(cfg)


@pytest.mark.parametrize(
    ("parse", "raw", "expected"),
    [
        (CacheConfig.from_dict, {"dir": "/tmp", "polcy": "error"}, r"did you mean cache\.policy"),
        (TextEncoderConfig.from_dict, {"max_lenght": 8}, r"did you mean text_encoder\.max_length"),
        (ScheduleConfig.from_dict, {"beta_schedul": "cosine"}, r"diffusion\.beta_schedule\?"),
        (
            DataConfig.from_dict,
            {**SYNTHETIC_DATA, "synthetic": {"num_trian": 5}},
            r"data\.synthetic\.num_trian=5: did you mean data\.synthetic\.num_train\?",
        ),
        (
            DataConfig.from_dict,
            {**SYNTHETIC_DATA, "train": {"annotations": "a.json", "image": "train"}},
            r"data\.train\.image='train': did you mean data\.train\.images\?",
        ),
    ],
)
def test_strict_section_parsers_suggest_the_close_match(parse, raw, expected: str) -> None:
    """What the stage-start check reports for Hydra configs, these parsers report for every
    other caller (exports, evaluate.py)."""
    with pytest.raises(UnknownConfigKeyError, match=expected):
        parse(raw)


# ---- the VAE export -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["model.unet.in_channels=8", "model.unet.out_channels=8"],
            r"4 latent channels .* in/out 8/8: set model\.unet\.in_channels=4",
        ),
        (["data.image_size=64"], r"trained on 32px images but data\.image_size=64"),
    ],
)
def test_a_vae_export_that_does_not_fit_the_unet_is_refused_before_caching(
    synthetic_overrides: list[str], vae_export: Path, tmp_path: Path, overrides, expected
) -> None:
    with pytest.raises(ValueError, match=expected):
        run_unet(synthetic_overrides, vae_export, *overrides, run_dir=tmp_path / "run")
    assert not (tmp_path / "data" / "cache" / "latents").exists()


@pytest.mark.parametrize("given", ["export", "run directory", "unet.json"])
def test_a_unet_export_given_as_the_vae_is_named_as_such(
    synthetic_overrides: list[str], unet_export: Path, tmp_path: Path, given: str
) -> None:
    path = {
        "export": unet_export,
        "run directory": unet_export.parent,
        "unet.json": unet_export / "unet.json",
    }[given]
    with pytest.raises(
        ValueError, match=r"U-Net export .* not a VAE export.*runs/vae/<run>/export"
    ):
        run_unet(synthetic_overrides, path, run_dir=tmp_path / "run")


def test_a_checkpoint_file_given_as_the_vae_is_refused(
    synthetic_overrides: list[str], tmp_path: Path
) -> None:
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}}, checkpoint)
    with pytest.raises(ValueError, match=r"last\.ckpt is a file, not a VAE export folder"):
        run_unet(synthetic_overrides, checkpoint, run_dir=tmp_path / "run")


def test_a_vae_run_directory_given_as_the_export_names_the_export_inside(
    synthetic_overrides: list[str], vae_export: Path, tmp_path: Path
) -> None:
    expected = rf"use vae_export={vae_export}$"
    with pytest.raises(ValueError, match=expected):
        run_unet(synthetic_overrides, vae_export.parent, run_dir=tmp_path / "run")


# ---- devices and precision ------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_an_absent_device_is_refused_naming_the_choices(
    synthetic_overrides: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("ldm.devices.mps_available", lambda: False)
    with pytest.raises(DeviceUnavailableError, match=rf"trainer={device} was requested.*auto"):
        run_vae(synthetic_overrides, f"trainer={device}", run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("precision", "suggested"), [("bf16-true", "bf16"), ("16-true", "16")])
def test_half_precision_weights_are_refused_for_the_stage_with_ema(
    synthetic_overrides: list[str], vae_export: Path, tmp_path: Path, precision, suggested
) -> None:
    expected = rf"trainer\.precision={precision} .*EMA.*trainer\.precision={suggested}-mixed"
    with pytest.raises(ValueError, match=expected):
        run_unet(
            synthetic_overrides, vae_export, f"trainer.precision={precision}", run_dir=tmp_path
        )


# ---- data ------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [0, -1])
def test_a_batch_size_below_one_is_refused(
    synthetic_overrides: list[str], vae_export: Path, tmp_path: Path, batch_size: int
) -> None:
    expected = rf"data\.batch_size must be at least 1, got {batch_size}"
    with pytest.raises(ValueError, match=expected):
        run_vae(synthetic_overrides, f"data.batch_size={batch_size}", run_dir=tmp_path / "vae")
    with pytest.raises(ValueError, match=expected):
        run_unet(
            synthetic_overrides,
            vae_export,
            f"data.batch_size={batch_size}",
            run_dir=tmp_path / "unet",
        )


def test_a_data_set_left_empty_by_bad_input_says_what_was_skipped(
    synthetic_root: Path, synthetic_overrides: list[str], tmp_path: Path
) -> None:
    root = Path(shutil.copytree(synthetic_root, tmp_path / "broken"))
    for image in (root / "train2017").iterdir():
        image.write_bytes(b"not a JPEG")
    expected = (
        rf"(?s)No usable images in .*captions_train2017\.json.*{SMALL_SYNTHETIC.num_train} bad "
        r"input\(s\) skipped.*corrupt, truncated or non-image file.*Fix or replace those files"
    )
    with pytest.raises(ValueError, match=expected):
        run_vae(synthetic_overrides, f"data.root={root}", run_dir=tmp_path / "run")


# ---- output paths ------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["paths.cache_dir", "paths.runs_dir"])
def test_an_output_path_that_is_a_file_is_refused(
    synthetic_overrides: list[str], tmp_path: Path, key: str
) -> None:
    blocking = tmp_path / "a-file"
    blocking.write_text("in the way")
    with pytest.raises(NotADirectoryError, match=rf"{key}={blocking} is a file"):
        run_vae(synthetic_overrides, f"{key}={blocking}", run_dir=tmp_path / "run")


def test_a_run_directory_under_a_file_is_refused(
    synthetic_overrides: list[str], tmp_path: Path
) -> None:
    blocking = tmp_path / "a-file"
    blocking.write_text("in the way")
    expected = rf"hydra\.run\.dir={blocking}/run lies under {blocking}, which is a file"
    with pytest.raises(NotADirectoryError, match=expected):
        run_vae(synthetic_overrides, run_dir=blocking / "run")


def test_a_latent_cache_dir_that_is_a_file_is_refused(
    synthetic_overrides: list[str], vae_export: Path, tmp_path: Path
) -> None:
    blocking = tmp_path / "a-file"
    blocking.write_text("in the way")
    with pytest.raises(NotADirectoryError, match=rf"cache\.dir={blocking} is a file"):
        run_unet(synthetic_overrides, vae_export, f"cache.dir={blocking}", run_dir=tmp_path / "r")


@pytest.mark.parametrize("script", ["train_vae.py", "sample.py"])
def test_an_entry_script_refuses_a_run_folder_under_a_file_before_hydra_creates_it(
    tmp_path: Path, script: str
) -> None:
    in_the_way = tmp_path / "runs"
    in_the_way.write_text("not a folder")

    completed = subprocess.run(
        [sys.executable, script, "experiment=demo", f"paths.runs_dir={in_the_way}"],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert completed.returncode != 0
    assert f"lies under {in_the_way}, which is a file" in completed.stderr
    assert "Traceback" not in completed.stderr


@pytest.mark.parametrize(
    ("script", "override", "options"),
    [
        ("train_unet.py", "experiment=null", "demo | none"),
        ("evaluate.py", "data=null", "coco | synthetic | synthetic_b"),
    ],
)
def test_an_entry_script_refuses_a_config_group_set_to_null_naming_its_options(
    script: str, override: str, options: str
) -> None:
    """Hydra itself fails on ``group=null`` with a traceback from inside its defaults list."""
    completed = subprocess.run(
        [sys.executable, script, override],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert completed.returncode != 0
    assert f"error: {override}: the config group" in completed.stderr
    assert options in completed.stderr
    assert "Traceback" not in completed.stderr


def test_null_is_refused_only_for_config_groups() -> None:
    refuse_null_config_groups(["data.subset=null", "vae_export=null", "experiment=demo"])
    with pytest.raises(SystemExit, match=r"\+logger=null: the config group 'logger'"):
        refuse_null_config_groups(["+logger=null"])
