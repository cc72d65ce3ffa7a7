"""Fréchet Inception Distance with torchmetrics' ``FrechetInceptionDistance``.

The feature network is the standard FID Inception-v3 (torch-fidelity's port of the TensorFlow
graph every published FID uses), 2048 pool features by default. It takes uint8 images
(``normalize=False``): the evaluation pixels already are uint8, so nothing is rescaled twice,
and it resizes them to 299 px itself (bilinear, antialiased). Any ``nn.Module`` mapping a
(B, 3, R, R) uint8 batch to (B, D) features can stand in for it — the tests inject a tiny one.

The metric keeps the real images' statistics across ``reset()``, so a sweep extracts the real
features once and only the generated ones per setting (a training curve: per measurement).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from ldm.evaluation.errors import EvaluationError, MetricWeightsUnavailableError, one_line

FEATURE_DIMS = (64, 192, 768, 2048)  # the Inception-v3 layers torchmetrics exposes
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_DESCRIPTION = "Inception-v3 FID network (torch-fidelity 'inception-v3-compat')"


@dataclass(frozen=True)
class FidSettings:
    """``conf/evaluate.yaml``'s ``fid`` group (``evaluation.fid`` in ``conf/train_unet.yaml``)."""

    feature_dim: int = 2048
    weights_file: Path | None = None  # a local copy of the Inception weights: no download
    config_key: str = "fid"  # where these settings are set, so messages name the right override

    def __post_init__(self) -> None:
        if self.feature_dim not in FEATURE_DIMS:
            raise EvaluationError(
                f"{self.config_key}.feature_dim={self.feature_dim} is not an Inception-v3 "
                f"feature layer; choose one of {FEATURE_DIMS} (2048 is the standard FID)."
            )
        if self.weights_file is not None and not Path(self.weights_file).is_file():
            raise EvaluationError(
                f"{self.config_key}.weights_file={self.weights_file} does not exist; point it at "
                f"a copy of {INCEPTION_WEIGHTS_FILE}, or set it to null to use (or fill) torch's "
                "hub cache."
            )


def build_fid(
    settings: FidSettings, feature_extractor: nn.Module | None = None
) -> FrechetInceptionDistance:
    """A FID metric over uint8 images; ``feature_extractor`` replaces Inception (tests).

    Each process measures only its own images: during training rank zero alone does, and a
    cross-process sync in ``compute()`` would wait forever for the others.
    """
    if feature_extractor is not None:
        return FrechetInceptionDistance(
            feature=feature_extractor,
            reset_real_features=False,
            normalize=False,
            sync_on_compute=False,
        )
    if importlib.util.find_spec("torch_fidelity") is None:
        raise EvaluationError(
            "FID's Inception network comes with the torch-fidelity package, which is not "
            "installed: run `make install` (or `pip install torch-fidelity`)."
        )
    weights = None if settings.weights_file is None else str(settings.weights_file)
    try:
        return FrechetInceptionDistance(
            feature=settings.feature_dim,
            reset_real_features=False,
            normalize=False,
            feature_extractor_weights_path=weights,
            sync_on_compute=False,
        )
    # torch.hub reports a failed download as URLError/HTTPError (OSErrors) or a RuntimeError.
    except (OSError, RuntimeError) as error:
        raise MetricWeightsUnavailableError(
            inception_unavailable_message(error, settings.config_key)
        ) from None


def inception_unavailable_message(error: BaseException, config_key: str) -> str:
    """What failed, where the weights come from and are cached, and how to get them offline."""
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
    return (
        f"FID needs the Inception-v3 weights, which could not be loaded ({one_line(error)}). "
        f"They are downloaded once from the internet (torch-fidelity's GitHub release, "
        f"{INCEPTION_WEIGHTS_FILE}) and cached in {cache_dir}. Without network, run "
        '`python -c "from torchmetrics.image.fid import FrechetInceptionDistance as F; '
        'F(feature=2048)"` once on a connected machine and copy '
        f"{INCEPTION_WEIGHTS_FILE} from its torch hub cache (~/.cache/torch/hub/checkpoints by "
        f"default) into {cache_dir} here, or pass {config_key}.weights_file=/path/to/it."
    )


def describe_features(fid: FrechetInceptionDistance, settings: FidSettings) -> dict[str, Any]:
    """Which network made the features and how many there are: FIDs compare only like for like."""
    if fid.used_custom_model:
        name = f"custom: {type(fid.inception).__name__}"
    else:
        name = INCEPTION_DESCRIPTION
    return {
        "feature_extractor": name,
        "feature_dim": int(fid.real_features_sum.shape[0]),
        "weights_file": None if settings.weights_file is None else str(settings.weights_file),
    }


@torch.no_grad()
def add_images(
    fid: FrechetInceptionDistance, batches: Iterable[torch.Tensor], *, real: bool
) -> int:
    """Feed (B, 3, R, R) uint8 batches into the real or generated side; returns the count."""
    count = 0
    for batch in batches:
        fid.update(batch.to(fid.device), real=real)
        count += batch.shape[0]
    return count


def fid_value(fid: FrechetInceptionDistance) -> float:
    """The distance between the two sides fed so far."""
    return float(fid.compute())
