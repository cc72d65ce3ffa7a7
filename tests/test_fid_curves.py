"""FID-k as a training curve: when it is measured, what it compares, what it refuses."""

from __future__ import annotations

import csv
import json
import urllib.error
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import test_unet_training
import torch
import torch.nn.functional as F
from helpers import compose_config
from omegaconf import OmegaConf
from torch import nn

import ldm.training.fid_curves as fid_curves
from ldm.data.config import DataConfig
from ldm.evaluation.errors import MetricWeightsUnavailableError
from ldm.evaluation.fid import FidSettings, build_fid
from ldm.evaluation.pixels import read_eval_pixels
from ldm.evaluation.validation_data import load_validation_set
from ldm.pipeline import SamplingOptions
from ldm.training.fid_curves import FidCurves, fid_k_metric, fid_k_reference
from ldm.training.unet_stage import (
    _adherence_curves,
    _evaluation_sampling,
    _fid_curves,
    run_unet_stage,
)

tiny_cfg = test_unet_training.tiny_cfg  # the stage-2 tests' tiny CPU run
vae_export = test_unet_training.vae_export  # and its tiny VAE export (a fixture)

RESOLUTION = 32
K = 12
BATCH_SIZE = 5  # two full sampling batches and a partial one


class CountingColours(nn.Module):
    """A stand-in for Inception — each image's colours averaged over a 2×2 grid, 12 features —
    that counts the images it has seen."""

    num_features = 12  # torchmetrics reads it instead of running a dummy image through

    def __init__(self) -> None:
        super().__init__()
        self.images_seen = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.images_seen += images.shape[0]
        return F.adaptive_avg_pool2d(images.float() / 255, 2).flatten(1)


class FakeEma:
    def __init__(self) -> None:
        self.active = False

    @contextmanager
    def swapped_in(self, unet: nn.Module):
        self.active = True
        try:
            yield
        finally:
            self.active = False


class KnownImagesPipeline:
    """A sampler whose output is known: prompt i (its context holds i) becomes ``images[i]``."""

    def __init__(self, images: torch.Tensor, ema: FakeEma) -> None:
        self.images = images  # (N, 3, R, R) uint8
        self.ema = ema
        self.calls: list[tuple[list[int], bool]] = []  # (seeds, with EMA weights)

    def generate_from_context(self, context, uncond, seeds, options) -> torch.Tensor:
        self.calls.append((list(seeds), self.ema.active))
        return self.images[context[:, 0, 0].long()].float() / 127.5 - 1  # model space


class FakeModule:
    """What the callback uses of LatentDiffusionModule."""

    def __init__(self, images: torch.Tensor) -> None:
        self.device = torch.device("cpu")
        self.unet = nn.Identity()
        self.empty_context = torch.zeros(1, 1, 1)
        self.ema = FakeEma()
        self.pipeline = KnownImagesPipeline(images, self.ema)

    def sampling_pipeline(self) -> KnownImagesPipeline:
        return self.pipeline


class RecordingLogger:
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append((step, metrics))


@pytest.fixture(scope="module")
def real_images(synthetic_root: Path, tmp_path_factory) -> list[Path]:
    """The first K validation images of the small synthetic set, as training would pick them."""
    cfg = compose_config("train_unet", ["data=synthetic", f"data.root={synthetic_root}"])
    data = DataConfig.from_dict(OmegaConf.to_container(cfg.data, resolve=True))
    validation = load_validation_set(data, seed=0, cache_dir=tmp_path_factory.mktemp("cache"))
    paths, _ = fid_k_reference(validation.records, K)
    return paths


def curves(real_images: list[Path], extractor: nn.Module, every_n_steps: int = 1) -> FidCurves:
    contexts = torch.arange(K, dtype=torch.float32).view(K, 1, 1)  # prompt i's context holds i
    return FidCurves(
        build_fid(FidSettings(), feature_extractor=extractor),
        real_images,
        contexts,
        every_n_steps=every_n_steps,
        sampling=SamplingOptions(sampler="ddim", steps=2),
        resolution_px=RESOLUTION,
        batch_size=BATCH_SIZE,
        seed=7,
    )


def test_fid_k_is_logged_once_every_n_optimizer_steps(real_images) -> None:
    callback = curves(real_images, CountingColours(), every_n_steps=2)
    module = FakeModule(read_eval_pixels(real_images, RESOLUTION))
    logger = RecordingLogger()
    # A sanity check runs before step 1; gradient accumulation repeats steps 2 and 5.
    batch_ends = [(0, True), (0, False), (1, False), (2, False), (2, False), (3, False)]
    batch_ends += [(4, False), (5, False), (5, False), (6, False)]
    for step, sanity in batch_ends:
        trainer = SimpleNamespace(global_step=step, sanity_checking=sanity, loggers=[logger])
        callback.on_train_batch_end(trainer, module, None, None, 0)
    assert [step for step, _ in logger.logged] == [1, 3, 5]  # after optimizer steps 2, 4 and 6
    assert all(list(metrics) == [f"eval/fid_{K}"] for _, metrics in logger.logged)


def test_real_features_are_extracted_once_across_measurements(real_images) -> None:
    extractor = CountingColours()
    callback = curves(real_images, extractor)
    module = FakeModule(read_eval_pixels(real_images, RESOLUTION))
    callback.measure(module)
    callback.measure(module)
    assert int(callback.fid.real_features_num_samples) == K
    assert extractor.images_seen == K + 2 * K  # the real images once, the samples each time


def test_samples_like_the_real_images_give_zero_and_unlike_them_more(real_images) -> None:
    callback = curves(real_images, CountingColours())
    pixels = read_eval_pixels(real_images, RESOLUTION)
    identical = callback.measure(FakeModule(pixels))[f"eval/fid_{K}"]
    different = callback.measure(FakeModule(255 - pixels))[f"eval/fid_{K}"]
    assert abs(identical) < 1e-4
    assert different > 0.5


def test_samples_use_the_ema_weights_and_the_same_seeds_at_every_measurement(real_images) -> None:
    callback = curves(real_images, CountingColours())
    module = FakeModule(read_eval_pixels(real_images, RESOLUTION))
    callback.measure(module)
    callback.measure(module)
    calls = module.pipeline.calls
    assert all(with_ema for _, with_ema in calls)
    assert all(len(seeds) <= BATCH_SIZE for seeds, _ in calls)
    seeds = [seed for batch, _ in calls for seed in batch]
    assert seeds == [*range(7, 7 + K)] * 2
    assert not module.ema.active  # the training weights are back


def coco_cfg(coco_sample: Path, tmp_path: Path, *extra: str):
    annotations = coco_sample / "annotations" / "captions_sample.json"
    return compose_config(
        "train_unet",
        [
            "data=coco",
            f"data.root={coco_sample}",
            f"data.val.annotations={annotations}",
            f"data.val.images={coco_sample / 'images'}",
            f"data.image_size={RESOLUTION}",
            f"paths.root_dir={tmp_path}",
            "evaluation.every_n_steps=100",
            *extra,
        ],
    )


class RecordingTextEncoder:
    def __init__(self) -> None:
        self.encoded: list[str] = []

    def encode_hidden_states(self, prompts: list[str], num_positions: int) -> torch.Tensor:
        self.encoded += prompts
        return torch.zeros(len(prompts), num_positions, 4)


def test_on_coco_the_prompts_are_the_first_caption_of_the_first_k_validation_images(
    coco_sample, tmp_path
) -> None:
    cfg = coco_cfg(coco_sample, tmp_path, "evaluation.fid_k=4")
    encoder = RecordingTextEncoder()
    fid = build_fid(FidSettings(), feature_extractor=CountingColours())
    callback = _fid_curves(cfg, fid, encoder, num_positions=8, seed=0)
    raw = json.loads((coco_sample / "annotations" / "captions_sample.json").read_text())
    first_images = raw["images"][:4]
    first_captions = [
        next(a["caption"] for a in raw["annotations"] if a["image_id"] == image["id"])
        for image in first_images
    ]
    assert [path.name for path in callback.real_images] == [i["file_name"] for i in first_images]
    assert encoder.encoded == [" ".join(caption.split()) for caption in first_captions]
    assert callback.contexts.shape == (4, 8, 4)


def test_on_coco_fid_k_runs_without_the_adherence_curves(coco_sample, tmp_path) -> None:
    cfg = coco_cfg(coco_sample, tmp_path, "evaluation.fid_k=4")
    assert _adherence_curves(cfg, text_encoder=None, num_positions=8) is None


def test_a_k_larger_than_the_validation_split_is_refused_with_both_numbers(
    coco_sample, tmp_path
) -> None:
    cfg = coco_cfg(coco_sample, tmp_path, "evaluation.fid_k=59")
    fid = build_fid(FidSettings(), feature_extractor=CountingColours())
    with pytest.raises(ValueError, match=r"fid_k=59 needs 59 .* has 58 usable ones"):
        _fid_curves(cfg, fid, RecordingTextEncoder(), num_positions=8, seed=0)


def test_a_k_below_two_is_refused_before_the_metric_is_built() -> None:
    with pytest.raises(ValueError, match=r"fid_k must be at least 2 .* got 1"):
        fid_k_metric(1, FidSettings())


def test_unreachable_inception_weights_stop_the_run_before_the_caches_are_built(
    synthetic_overrides, vae_export, tmp_path, monkeypatch
) -> None:
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(inception, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cfg = tiny_cfg(
        synthetic_overrides, vae_export, "evaluation.every_n_steps=2", "evaluation.fid_k=4"
    )
    with pytest.raises(MetricWeightsUnavailableError) as error:
        run_unet_stage(cfg, run_dir=tmp_path / "run")
    message = str(error.value)
    assert "Inception-v3 weights" in message and "name resolution" in message
    assert "on a connected machine" in message
    assert "evaluation.fid.weights_file=" in message
    assert not Path(cfg.cache.dir).exists()  # no latent was encoded


def test_fid_k_and_adherence_are_logged_together_while_training(
    synthetic_overrides, vae_export, tmp_path, monkeypatch
) -> None:
    extractor = CountingColours()
    monkeypatch.setattr(
        fid_curves, "build_fid", lambda settings: build_fid(settings, feature_extractor=extractor)
    )
    cfg = tiny_cfg(
        synthetic_overrides,
        vae_export,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=4",
        "logger=csv",
        "evaluation.every_n_steps=2",
        "evaluation.fid_k=4",
        "evaluation.prompts_per_split=2",
        "evaluation.sampling.steps=2",
    )
    result = run_unet_stage(cfg, run_dir=tmp_path / "run")
    rows = list(csv.DictReader((result.run_dir / "csv" / "metrics.csv").open()))
    fid_rows = [row for row in rows if row.get("eval/fid_4")]
    adherence_rows = [row for row in rows if row.get("eval/adherence_heldout_background")]
    assert [int(row["step"]) for row in fid_rows] == [1, 3]  # after optimizer steps 2 and 4
    assert [int(row["step"]) for row in adherence_rows] == [1, 3]
    assert all(float(row["eval/fid_4"]) >= 0 for row in fid_rows)
    assert extractor.images_seen == 4 + 2 * 4  # the real images once, the samples each time


def test_evaluation_sampling_options_are_checked_before_training() -> None:
    """A bad ``evaluation.sampling`` stops the run when its curves are built, not at the first
    measurement thousands of steps in."""
    cfg = compose_config("train_unet", ["evaluation.sampling.steps=500"])
    with pytest.raises(ValueError, match=r"evaluation\.sampling: steps=500 is outside 1\.\.200"):
        _evaluation_sampling(cfg)
