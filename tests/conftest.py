"""Shared test fixtures: no network, small data made by the project, the real COCO sample."""

from __future__ import annotations

import os
from pathlib import Path

# Tests never touch the network: W&B records locally, hub downloads fail at once.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ["WANDB_SILENT"] = "true"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_DIR", "/tmp")

import pytest
from helpers import (
    COCO_SAMPLE,
    SMALL_SYNTHETIC,
    register_tiny_clip,
    synthetic_run_overrides,
)

from ldm.data.coco_index import CaptionedImage, build_caption_index
from ldm.data.synthetic import generate_synthetic_dataset


@pytest.fixture(scope="session")
def coco_sample() -> Path:
    """58 real COCO val2017 images with their official captions (see its SOURCE.md)."""
    if not (COCO_SAMPLE / "annotations" / "captions_sample.json").is_file():
        pytest.fail(f"The real-data fixture is missing: expected it at {COCO_SAMPLE}")
    return COCO_SAMPLE


@pytest.fixture(scope="session")
def coco_records(
    coco_sample: Path, tmp_path_factory: pytest.TempPathFactory
) -> list[CaptionedImage]:
    """The real COCO sample's records, indexed once (each image checked) in file order."""
    records, _ = build_caption_index(
        coco_sample / "annotations" / "captions_sample.json",
        coco_sample / "images",
        check_cache_dir=tmp_path_factory.mktemp("checks"),
    )
    return records


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
    register_tiny_clip(tmp_path_factory.mktemp("open_clip_configs"))
