"""Helpers the tests import: composing the real configs, the paths of shared fixtures."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from ldm.data.synthetic import SyntheticConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
COCO_SAMPLE = REPO_ROOT.parent / "shared" / "fixtures" / "coco-sample"
SMALL_SYNTHETIC = SyntheticConfig(num_train=48, num_val=16, num_heldout=12, seed=3)
# A CLIP small enough to build in milliseconds; same tokenizer and causal text transformer.
# conftest.py registers it with open_clip for every test.
TINY_CLIP = "ldm-test-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


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
