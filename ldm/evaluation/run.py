"""``evaluate.py`` end to end: check the request, load what it needs, measure, write the record.

Order of cost: the request is checked first, then the models are loaded, then every metric
network (Inception, CLIP) and the adherence analyser's self-check — so a missing download or a
bad setting fails within seconds, before any sampling — and only then are samples made.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from tqdm.auto import tqdm

from ldm.data.coco_index import CaptionedImage
from ldm.data.config import DataConfig
from ldm.devices import DeviceSettings
from ldm.evaluation import adherence
from ldm.evaluation.clip_score import ClipScorer
from ldm.evaluation.errors import EvaluationError
from ldm.evaluation.fid import add_images, build_fid, describe_features
from ldm.evaluation.generation import SamplingModel, load_sampling_model
from ldm.evaluation.pixels import RESIZE_METHOD, batched, number_of_batches, read_eval_pixels
from ldm.evaluation.plot import PLOT_FILENAME, plot_sweep
from ldm.evaluation.reconstruction import measure_reconstruction
from ldm.evaluation.request import (
    EvaluationRequest,
    SweepSetting,
    read_captions_file,
    request_from_config,
)
from ldm.evaluation.results import SCHEMA_VERSION, write_results
from ldm.evaluation.sweep import SampleJudges, SamplingPlan, measure_setting
from ldm.evaluation.validation_data import (
    ValidationSet,
    load_validation_set,
    prepare_data_source,
    validation_captions,
)
from ldm.evaluation.wandb_log import log_to_wandb
from ldm.exports import load_vae_export
from ldm.models.vae import VAE
from ldm.sampling import SamplingError, load_sampling_checkpoint
from ldm.sampling.run import sampling_device

log = logging.getLogger(__name__)

CAPTIONS_FILENAME = "captions.txt"
SAMPLES_DIR = "samples"
VALIDATION_CAPTIONS = (
    "validation captions: the first caption of each validation image in annotation order, "
    "then the second, ..."
)


@dataclass(frozen=True)
class EvaluationResult:
    out_dir: Path
    results: dict[str, Any]  # what results.json holds (see ldm.evaluation.results)
    plot_path: Path | None  # sweep.png, when U-Net metrics were measured


@dataclass(frozen=True)
class MeasuredVAE:
    """A VAE and what identifies it."""

    vae: VAE
    export: Path
    sha256: str
    image_size: int

    def describe(self) -> dict[str, Any]:
        return {"export": str(self.export), "sha256": self.sha256}


def run_evaluation(
    cfg: DictConfig, *, feature_extractor: nn.Module | None = None
) -> EvaluationResult:
    """Evaluate as ``cfg`` (``conf/evaluate.yaml``) asks; see evaluate.py.

    ``feature_extractor`` replaces FID's Inception network (for rFID too): any module mapping
    uint8 images (B, 3, R, R) to features (B, D). The tests pass a tiny one; nothing is
    downloaded then.
    """
    request = request_from_config(cfg)
    device = sampling_device(cfg.trainer)
    try:
        data = DataConfig.from_dict(OmegaConf.to_container(cfg.data, resolve=True))
    except ValueError as error:
        raise EvaluationError(f"The data config is not usable: {error}") from None
    prepare_data_source(data)
    model, sweep_settings = None, ()
    if request.needs_unet:
        model = load_sampling_model(request.ckpt, request.weights, request.vae_export, device)
        sweep_settings = request.sweep_settings(model.pipeline.schedule.config)
    vae = _vae_of(model, request, data)
    resolution = request.resolution_px or vae.image_size
    validation = None
    if _needs_validation(request):
        validation = load_validation_set(
            data, seed=request.seed, cache_dir=Path(cfg.paths.cache_dir)
        )
    request.out_dir.mkdir(parents=True, exist_ok=True)

    settings: dict[str, Any] = {
        "seed": request.seed,
        "resolution_px": resolution,
        "resize": RESIZE_METHOD,
        "batch_size": request.batch_size,
        "device": device.device,
        "precision": device.precision,
    }
    # Every network first (a missing download fails now), then the work.
    sample_fid = _fid(request, device, feature_extractor) if "fid" in request.metrics else None
    reconstruction_fid = None
    if "reconstruction" in request.metrics:
        reconstruction_fid = _fid(request, device, feature_extractor)
    clip = None
    if "clip_score" in request.metrics:
        clip = ClipScorer(request.clip_score, device.torch_device)
        settings["clip_score"] = request.clip_score.describe()
    adherence_prompts = None
    if "adherence" in request.metrics:
        adherence_prompts, settings["adherence"] = _adherence_reference(
            request, vae, data, resolution
        )
    captions = None
    if request.needs_captions:
        captions, settings["captions"] = _captions(request, validation)
        settings["num_samples"] = request.num_samples
    if sample_fid is not None:
        settings["num_real_images"] = _fill_real_side(sample_fid, request, validation, resolution)
        settings["fid"] = describe_features(sample_fid, request.fid)
    judges = SampleJudges(
        captions, sample_fid, clip, adherence_prompts, request.adherence.images_per_prompt
    )

    sweep = [] if model is None else _sweep(model, sweep_settings, request, judges, resolution)
    reconstruction = None
    if reconstruction_fid is not None:
        if "fid" not in settings:
            settings["fid"] = describe_features(reconstruction_fid, request.fid)
        reconstruction = _reconstruction(
            request, vae, validation, resolution, reconstruction_fid, device
        )

    results = {
        "schema_version": SCHEMA_VERSION,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "metrics": list(request.metrics),
        "evaluated": {
            "unet": None if model is None else _describe_unet(model),
            "vae": vae.describe(),
        },
        "data": {
            "source": data.source,
            "root": str(data.root),
            "validation": None if validation is None else validation.describe(),
        },
        "settings": settings,
        "sweep": sweep,
        "reconstruction": reconstruction,
    }
    write_results(request.out_dir, results)
    plot_path = plot_sweep(sweep, request.out_dir / PLOT_FILENAME) if sweep else None
    logger_cfg = OmegaConf.to_container(cfg.logger, resolve=True)
    if logger_cfg.get("kind") == "wandb":
        log_to_wandb(logger_cfg, request.out_dir, results, plot_path)
    return EvaluationResult(request.out_dir, results, plot_path)


def _sweep(
    model: SamplingModel,
    settings: Sequence[SweepSetting],
    request: EvaluationRequest,
    judges: SampleJudges,
    resolution: int,
) -> list[dict[str, Any]]:
    """Every setting's metrics, each on its own samples (kept under samples/<setting>/)."""
    plan = SamplingPlan(request.seed, request.batch_size, resolution, request.progress)
    sweep = []
    for setting in settings:
        interval = setting.options.guidance_interval
        samples_dir = request.out_dir / SAMPLES_DIR / setting.slug
        log.info("Measuring %s; samples go to %s", setting.label, samples_dir)
        sweep.append(
            {
                "sampler": setting.options.sampler,
                "eta": setting.options.eta,
                "steps": setting.options.steps,
                "cfg_scale": setting.options.cfg_scale,
                "guidance_interval": interval and interval.as_config(),
                "samples_dir": str(samples_dir.relative_to(request.out_dir)),
                "metrics": measure_setting(model, setting, judges, plan, samples_dir),
            }
        )
    return sweep


def _needs_validation(request: EvaluationRequest) -> bool:
    """FID's real images, the default captions and the reconstruction inputs all come from it."""
    return (
        "fid" in request.metrics
        or "reconstruction" in request.metrics
        or (request.needs_captions and request.captions_file is None)
    )


def _vae_of(
    model: SamplingModel | None, request: EvaluationRequest, data: DataConfig
) -> MeasuredVAE:
    """The U-Net's VAE (already fingerprint-checked), or the VAE export to measure: vae_export=,
    else the one the checkpoint names."""
    if model is not None:
        checkpoint = model.checkpoint
        export = Path(request.vae_export or checkpoint.vae_export).resolve()
        return MeasuredVAE(
            model.pipeline.vae, export, checkpoint.vae_weights_sha256, checkpoint.image_size
        )
    export = request.vae_export
    if export is None:
        try:
            export = load_sampling_checkpoint(request.ckpt, request.weights).vae_export
        except SamplingError as error:
            raise EvaluationError(
                "metrics=[reconstruction] measures the VAE export given as vae_export= "
                f"(runs/vae/<run>/export), else the one the U-Net ckpt= names, but: {error}"
            ) from None
    try:
        vae, metadata = load_vae_export(export)
    except (FileNotFoundError, ValueError) as error:
        raise EvaluationError(
            f"Cannot load the VAE export {export}: {error} Pass vae_export= the export "
            "directory train_vae.py wrote (runs/vae/<run>/export)."
        ) from None
    image_size = int(metadata.get("extra", {}).get("image_size", data.image_size))
    return MeasuredVAE(vae, Path(export).resolve(), metadata["weights_sha256"], image_size)


def _describe_unet(model: SamplingModel) -> dict[str, Any]:
    checkpoint = model.checkpoint
    return {
        "checkpoint": str(checkpoint.source),
        "weights": checkpoint.weights,
        "sha256": checkpoint.fingerprint,
        "image_size": checkpoint.image_size,
    }


def _fid(
    request: EvaluationRequest, device: DeviceSettings, feature_extractor: nn.Module | None
) -> FrechetInceptionDistance:
    return build_fid(request.fid, feature_extractor).to(device.torch_device)


def _captions(
    request: EvaluationRequest, validation: ValidationSet | None
) -> tuple[list[str], dict[str, Any]]:
    """The fixed caption list (one sample each), written beside the results with its SHA-256."""
    if request.captions_file is not None:
        base = read_captions_file(request.captions_file)
        source = f"captions_file {request.captions_file}, in order, repeated as needed"
    else:
        base = validation_captions(validation.records, request.num_samples)
        source = VALIDATION_CAPTIONS
    captions = [base[index % len(base)] for index in range(request.num_samples)]
    path = request.out_dir / CAPTIONS_FILENAME
    path.write_text("\n".join(captions) + "\n", encoding="utf-8")
    record = {
        "file": CAPTIONS_FILENAME,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "count": len(captions),
        "source": source,
    }
    return captions, record


def _pixel_batches(
    records: Sequence[CaptionedImage],
    resolution: int,
    request: EvaluationRequest,
    description: str,
) -> Iterator[torch.Tensor]:
    """Validation images as uint8 batches at the evaluation resolution, with a progress bar."""
    chunks = batched(records, request.batch_size)
    total = number_of_batches(len(records), request.batch_size)
    for chunk in tqdm(
        chunks, total=total, desc=description, disable=not request.progress, dynamic_ncols=True
    ):
        yield read_eval_pixels([record.path for record in chunk], resolution)


def _fill_real_side(
    fid: FrechetInceptionDistance,
    request: EvaluationRequest,
    validation: ValidationSet,
    resolution: int,
) -> int:
    """Extract the real images' features once; every sweep setting is compared with them."""
    records = validation.records[: request.num_real_images]
    if len(records) < 2:
        raise EvaluationError(
            f"FID needs at least 2 real images, but the validation split has {len(records)}; "
            "use a data source with a larger validation split."
        )
    batches = _pixel_batches(records, resolution, request, "FID: real image features")
    return add_images(fid, batches, real=True)


def _adherence_reference(
    request: EvaluationRequest, vae: MeasuredVAE, data: DataConfig, resolution: int
) -> tuple[dict[str, dict[str, adherence.Attributes]], dict[str, Any]]:
    """Check the analyser (refusing to judge if it fails), measure the VAE ceiling and pick
    the prompts; returns the prompts and what results.json records about them."""
    settings = request.adherence
    check = adherence.check_analyser(data.root, resolution, settings.analyser_check_images)
    adherence.require_reliable_analyser(check)
    ceiling = adherence.vae_ceiling(vae.vae, data.root, resolution, settings.vae_ceiling_images)
    prompts = adherence.prompt_sets(data.root, settings.prompts)
    reference = {
        "prompts_per_split": settings.prompts,
        "images_per_prompt": settings.images_per_prompt,
        "chance": adherence.CHANCE_LEVELS,
        "analyser_check": check.as_dict(),
        "vae_ceiling": ceiling.as_dict(),
    }
    return prompts, reference


def _reconstruction(
    request: EvaluationRequest,
    vae: MeasuredVAE,
    validation: ValidationSet,
    resolution: int,
    fid: FrechetInceptionDistance,
    device: DeviceSettings,
) -> dict[str, Any]:
    records = validation.records[: request.reconstruction_images]
    batches = _pixel_batches(records, resolution, request, "VAE reconstruction")
    scores = measure_reconstruction(
        vae.vae.to(device.torch_device).eval(), batches, fid, resolution
    )
    return scores.as_dict()
