"""Helpers the tests import: composing the real configs, the paths of shared fixtures."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig
from torch.utils.data import Dataset

import ldm.config.schemas  # noqa: F401  (registers the schemas conf/*.yaml name)
from ldm.data.batch_randomness import StepRandomness, batch_generator
from ldm.data.config import DataConfig
from ldm.data.synthetic import SyntheticConfig
from ldm.exports import save_vae_export
from ldm.models.vae import VAE, VAEConfig
from ldm.training.diffusion_module import LatentDiffusionModule

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
COCO_SAMPLE = REPO_ROOT.parent / "shared" / "fixtures" / "coco-sample"
SMALL_SYNTHETIC = SyntheticConfig(num_train=48, num_val=16, num_heldout=12, seed=3)
# A CLIP small enough to build in milliseconds; same tokenizer and causal text transformer.
# conftest.py registers it with open_clip for every test (register_tiny_clip).
TINY_CLIP = "ldm-test-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def register_tiny_clip(folder: Path) -> None:
    """Make :data:`TINY_CLIP` an open_clip model name in this process (its config written to
    ``folder``); processes a test starts itself, which conftest.py does not reach, call it too."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(folder)


# A VAE for 32 px images (4×16×16 latents) that builds in milliseconds, and latent statistics
# as train_vae.py records them, for exports of an untrained one.
TINY_VAE_CONFIG = VAEConfig(block_channels=(16, 32), layers_per_block=1, norm_groups=8)
# train_vae.py overrides for the demo recipe shrunk to a VAE about that size on 32 px images.
TINY_VAE_RUN = [
    "experiment=demo",
    "data.image_size=32",
    "data.batch_size=4",
    "model.vae.block_channels=[16,32]",
    "model.vae.norm_groups=8",
    "logging.num_images=2",
    "logger=none",
]
# train_unet.py overrides for the demo recipe shrunk to a two-level U-Net over the latents of
# that VAE (32 px images).
TINY_UNET_RUN = [
    "experiment=demo",
    "model.denoiser=unet",  # the demo trains a DiT; these runs a tiny U-Net
    "data.image_size=32",
    "model.unet.model_channels=16",
    "model.unet.channel_multipliers=[1,2]",
    "model.unet.transformer_levels=[1]",
    "model.unet.norm_groups=8",
    "model.unet.attention_head_dim=16",
]
TINY_LATENT_STATS = {
    "channel_mean": [0.0] * 4,
    "channel_std": [1.0] * 4,
    "global_mean": 0.0,
    "global_std": 2.0,
    "scale_factor": 0.5,
    "num_latents": 8,
    "sampled_posterior": True,
}


def save_tiny_vae_export(directory: Path) -> Path:
    """A random (seed 0) :data:`TINY_VAE_CONFIG` VAE exported into ``directory`` as
    train_vae.py would, for 32 px images; the global random state is left alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = VAE(TINY_VAE_CONFIG)
    return save_vae_export(directory, vae, latent_stats=TINY_LATENT_STATS, extra={"image_size": 32})


# A one-level U-Net module over (4, 8, 8) latents and 3 text positions of width 16: a few
# thousand parameters, for tests of the training step itself.
TINY_LATENT_SHAPE = (4, 8, 8)
TINY_CONTEXT = (3, 16)  # (positions, width)
TINY_OPTIM = {
    "lr": 1e-3,
    "betas": [0.9, 0.999],
    "weight_decay": 0.0,
    "lr_schedule": "constant",
    "lr_warmup_steps": 0,
    "min_lr_ratio": 0.0,
}


def tiny_diffusion_module(
    module_class: type[LatentDiffusionModule] = LatentDiffusionModule, **overrides: Any
) -> LatentDiffusionModule:
    """A ``module_class`` with the tiny U-Net; ``overrides`` replace constructor arguments. Seeds
    the global random state with 0 first, so every call builds the same weights."""
    torch.manual_seed(0)
    arguments: dict[str, Any] = {
        "unet": {
            "model_channels": 8,
            "channel_multipliers": [1],
            "res_blocks_per_level": 1,
            "transformer_levels": [0],
            "norm_groups": 4,
            "attention_head_dim": 8,
            "context_dim": TINY_CONTEXT[1],
        },
        "diffusion": {},
        "optim": TINY_OPTIM,
        "ema": {},
        "cond_dropout": 0.2,
        "latent_norm": {"kind": "global", "scale_factor": 0.5},
        "latent_shape": list(TINY_LATENT_SHAPE),
        "context_length": TINY_CONTEXT[0],
        "validation": {"timestep_buckets": 2},
        "provenance": {},
    }
    return module_class(**(arguments | overrides))


class TinyLatentBatches(Dataset):
    """Stand-in for the latent cache of :func:`tiny_diffusion_module`: random float16 latents
    and text states, with the step's randomness drawn the way the real loader draws it
    (``__getitems__`` over the sampler's keys)."""

    def __init__(self, size: int, randomness: StepRandomness) -> None:
        self.size = size
        self.randomness = randomness

    def __len__(self) -> int:
        return self.size

    def __getitems__(self, keys: list[int]) -> dict[str, torch.Tensor]:
        generator = batch_generator([(key, key) for key in keys])
        count = len(keys)
        batch = {
            "index": torch.tensor(keys),
            "latent_mean": torch.randn(count, *TINY_LATENT_SHAPE, generator=generator).half(),
            "latent_std": torch.rand(count, *TINY_LATENT_SHAPE, generator=generator).half(),
            "text_hidden_states": torch.randn(count, *TINY_CONTEXT, generator=generator).half(),
        }
        return batch | self.randomness.draw(count, generator)


def synthetic_run_overrides(synthetic_root: Path, root_dir: Path) -> list[str]:
    """Hydra overrides for a CPU run on the small synthetic set, writing under ``root_dir``."""
    return [
        "data=synthetic",
        f"data.root={synthetic_root}",
        f"data.synthetic.num_train={SMALL_SYNTHETIC.num_train}",
        f"data.synthetic.num_val={SMALL_SYNTHETIC.num_val}",
        f"data.synthetic.num_heldout={SMALL_SYNTHETIC.num_heldout}",
        f"data.synthetic.seed={SMALL_SYNTHETIC.seed}",
        f"paths.root_dir={root_dir}",
        "trainer=cpu",
        "trainer.num_workers=0",
    ]


def synthetic_data_config(root: Path, **changes: Any) -> DataConfig:
    """The ``data`` config of the small synthetic set at ``root``: its own train and val splits,
    32 px images, batches of 8; ``changes`` replace keys."""
    values = {
        "source": "synthetic",
        "root": str(root),
        "train": {
            "annotations": str(root / "annotations" / "captions_train2017.json"),
            "images": str(root / "train2017"),
        },
        "val": {
            "annotations": str(root / "annotations" / "captions_val2017.json"),
            "images": str(root / "val2017"),
        },
        "batch_size": 8,
        "image_size": 32,
        "synthetic": vars(SMALL_SYNTHETIC),  # prepare_data must find the generated set current
    }
    return DataConfig.from_dict(values | changes)


def compose_config(config_name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose a real entry-script config the way ``@hydra.main`` would (struct mode on)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides or [])


class RecordBatches(Callback):
    """Remembers the image ids of every training batch."""

    def __init__(self) -> None:
        self.seen: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(batch["image_id"].tolist())


class SimulatedCrash(RuntimeError):
    """Raised by :class:`CrashAfterSteps`."""


class CrashAfterSteps(Callback):
    """Kills training once ``steps`` optimizer steps are done (and checkpointed), like a job
    stopped by its scheduler: no epoch-end hooks, no final checkpoint."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.steps:
            raise SimulatedCrash(f"stopped after {self.steps} steps")


@dataclass
class InterruptedRuns:
    """Batches seen and run directories of: an uninterrupted run, one stopped early, its resume."""

    whole: list[list[int]]
    first: list[list[int]]
    resumed: list[list[int]]
    whole_dir: Path
    resumed_dir: Path


def run_whole_interrupted_and_resumed(
    stage_module: Any,
    run_stage: Callable[[DictConfig, Path], Any],
    make_cfg: Callable[..., DictConfig],
    tmp_path: Path,
    monkeypatch: Any,
    *,
    stop_after_steps: int,
) -> InterruptedRuns:
    """Train three times with ``stage_module._callbacks`` extended by recorders (and a crash for
    the interrupted run); the third run resumes from the second's ``last.ckpt``."""
    recorders: list[RecordBatches] = []
    extra: list[Callback] = []
    original = stage_module._callbacks

    def with_recorder(cfg, run_dir, with_logger):
        callbacks, best = original(cfg, run_dir, with_logger)
        recorders.append(RecordBatches())
        return [*callbacks, *extra, recorders[-1]], best  # a crash stops the recording too

    monkeypatch.setattr(stage_module, "_callbacks", with_recorder)
    run_stage(make_cfg(), tmp_path / "whole")
    extra.append(CrashAfterSteps(stop_after_steps))
    with pytest.raises(SimulatedCrash):
        run_stage(make_cfg(), tmp_path / "first")
    extra.clear()
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    run_stage(make_cfg(f"ckpt_path={last}"), tmp_path / "resumed")
    whole, first, resumed = (recorder.seen for recorder in recorders)
    return InterruptedRuns(whole, first, resumed, tmp_path / "whole", tmp_path / "resumed")
