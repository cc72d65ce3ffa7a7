"""Shared test fixtures: no network, small data made by the project, the real COCO sample."""

from __future__ import annotations

import os
from pathlib import Path

# Tests never touch the network: W&B records locally, hub downloads fail at once.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ["WANDB_SILENT"] = "true"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_DIR", "/tmp")

import json

import open_clip
import pytest
from helpers import (
    COCO_SAMPLE,
    SMALL_SYNTHETIC,
    TINY_CLIP,
    TINY_CLIP_CONFIG,
    synthetic_run_overrides,
)

from ldm.data.synthetic import generate_synthetic_dataset


@pytest.fixture(scope="session")
def coco_sample() -> Path:
    """58 real COCO val2017 images with their official captions (see its SOURCE.md)."""
    if not (COCO_SAMPLE / "annotations" / "captions_sample.json").is_file():
        pytest.fail(f"The real-data fixture is missing: expected it at {COCO_SAMPLE}")
    return COCO_SAMPLE


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset, generated once per test session."""
    return generate_synthetic_dataset(
        tmp_path_factory.mktemp("data") / "synthetic", SMALL_SYNTHETIC
    )


@pytest.fixture
def synthetic_overrides(synthetic_root: Path, tmp_path: Path) -> list[str]:
    """Hydra overrides that point a run at the small synthetic set and a temporary root."""
    return synthetic_run_overrides(synthetic_root, tmp_path)


@pytest.fixture(scope="session", autouse=True)
def tiny_clip_registered(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Makes ``helpers.TINY_CLIP`` an open_clip model name, for every test."""
    folder = tmp_path_factory.mktemp("open_clip_configs")
    (folder / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(folder)
