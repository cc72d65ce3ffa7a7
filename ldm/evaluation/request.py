"""What the user asked ``evaluate.py`` for, checked once before any model or image is loaded.

The sweep's sampling options are checked once the checkpoint is loaded (``sweep_settings``), as
its objective names the samplers that fit and its T bounds the steps; everything else that can be
wrong in ``conf/evaluate.yaml`` is refused here with a message that names the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from ldm.diffusion import ScheduleConfig
from ldm.evaluation.clip_score import ClipScoreSettings
from ldm.evaluation.errors import EvaluationError
from ldm.evaluation.fid import FidSettings
from ldm.pipeline import SamplingOptions

UNET_METRICS = ("fid", "clip_score", "adherence")  # need samples from a U-Net checkpoint
VAE_METRICS = ("reconstruction",)
METRICS = (*UNET_METRICS, *VAE_METRICS)
LOGGERS = ("none", "wandb")  # the sweep's table and plot are images: CSV cannot hold them


@dataclass(frozen=True)
class SweepSetting:
    """One point of the guidance sweep."""

    options: SamplingOptions

    @property
    def label(self) -> str:
        options = self.options
        noise = f", eta {options.eta:g}" if options.eta else ""
        interval = options.guidance_interval
        guided = "" if interval is None else f" on σ in {interval}"
        return f"{options.sampler} {options.steps} steps, cfg {options.cfg_scale:g}{guided}{noise}"

    @property
    def slug(self) -> str:
        """A folder name for the setting's samples, e.g. ``ddim-25steps-cfg7.5``
        (``euler-25steps-cfg3-eta1`` for a stochastic sampler, ``-gi0.43-inf`` with a guidance
        interval)."""
        options = self.options
        noise = f"-eta{options.eta:g}" if options.eta else ""
        interval = options.guidance_interval
        guided = "" if interval is None else f"-gi{interval.low:g}-{interval.high:g}"
        return f"{options.sampler}-{options.steps}steps-cfg{options.cfg_scale:g}{guided}{noise}"


@dataclass(frozen=True)
class AdherenceSettings:
    """``conf/evaluate.yaml``'s ``adherence`` group."""

    prompts: int = 12  # per split (training and held-out combinations)
    images_per_prompt: int = 2
    vae_ceiling_images: int = 100
    analyser_check_images: int = 200


@dataclass(frozen=True)
class EvaluationRequest:
    metrics: tuple[str, ...]
    ckpt: Path
    weights: str
    vae_export: Path | None
    sampler: Any  # the sweep, as given: checked by sweep_settings with the checkpoint
    eta: Any
    steps: tuple[Any, ...]
    cfg_scales: tuple[Any, ...]
    guidance_interval: Any  # as given, like sampler and eta
    num_samples: int  # generated images per setting for FID and CLIP score
    captions_file: Path | None
    num_real_images: int | None  # validation images in FID's real set; None → all
    resolution_px: int | None  # None → the model's own image size
    seed: int
    batch_size: int
    fid: FidSettings
    clip_score: ClipScoreSettings
    adherence: AdherenceSettings
    reconstruction_images: int | None  # None → every validation image
    out_dir: Path
    progress: bool

    @property
    def needs_unet(self) -> bool:
        return any(metric in UNET_METRICS for metric in self.metrics)

    @property
    def needs_captions(self) -> bool:
        """FID and CLIP score are measured on samples of one fixed caption list."""
        return "fid" in self.metrics or "clip_score" in self.metrics

    def sweep_settings(self, diffusion: ScheduleConfig) -> tuple[SweepSetting, ...]:
        """Every cfg_scale × every steps value, checked against the checkpoint's diffusion
        config (its objective's samplers, its T)."""
        try:
            return tuple(
                SweepSetting(
                    SamplingOptions.checked(
                        diffusion=diffusion,
                        sampler=self.sampler,
                        eta=self.eta,
                        steps=steps,
                        cfg_scale=cfg_scale,
                        guidance_interval=self.guidance_interval,
                    )
                )
                for cfg_scale in self.cfg_scales
                for steps in self.steps
            )
        except ValueError as error:
            raise EvaluationError(f"The guidance sweep cannot run: {error}") from None


def request_from_config(cfg: DictConfig) -> EvaluationRequest:
    """Parse and check ``conf/evaluate.yaml``'s keys (the data group is read where it is used)."""
    metrics = _metrics(cfg.metrics)
    logger_kind = cfg.logger.get("kind")
    if logger_kind not in LOGGERS:
        raise EvaluationError(
            f"logger={logger_kind} cannot record the sweep's table and plot; evaluation "
            f"supports {' | '.join(LOGGERS)} (results.json, results.md and sweep.png are written "
            "either way)."
        )
    num_samples = _positive_int("num_samples", cfg.num_samples)
    if "fid" in metrics and num_samples < 2:
        raise EvaluationError(
            f"num_samples={num_samples}: FID compares covariances, which need at least 2 "
            "generated images (a few thousand for a stable number; FID is biased upwards for "
            "small sets, so compare FIDs only at the same num_samples)."
        )
    num_real = _optional(cfg.num_real_images, lambda v: _positive_int("num_real_images", v))
    if "fid" in metrics and num_real is not None and num_real < 2:
        raise EvaluationError(f"num_real_images={num_real}: FID needs at least 2 real images.")
    captions_file = _optional(cfg.captions_file, Path)
    if captions_file is not None and not captions_file.is_file():
        raise EvaluationError(
            f"captions_file={captions_file} does not exist; give a UTF-8 text file with one "
            "caption per line, or null to use the validation captions."
        )
    adherence = AdherenceSettings(
        **{key: _positive_int(f"adherence.{key}", value) for key, value in cfg.adherence.items()}
    )
    return EvaluationRequest(
        metrics=metrics,
        ckpt=Path(cfg.ckpt),
        weights=str(cfg.weights),
        vae_export=_optional(cfg.vae_export, Path),
        sampler=cfg.sampler,
        eta=cfg.eta,
        steps=tuple(_list("steps", cfg.steps)),
        cfg_scales=tuple(_list("cfg_scales", cfg.cfg_scales)),
        guidance_interval=cfg.guidance_interval,
        num_samples=num_samples,
        captions_file=captions_file,
        num_real_images=num_real,
        resolution_px=_optional(cfg.resolution, _resolution),
        seed=cfg.seed,
        batch_size=_positive_int("batch_size", cfg.batch_size),
        fid=FidSettings(
            feature_dim=cfg.fid.feature_dim,
            weights_file=_optional(cfg.fid.weights_file, Path),
        ),
        clip_score=ClipScoreSettings(
            model_name=str(cfg.clip_score.model_name),
            pretrained=_optional(cfg.clip_score.pretrained, str),
            weights_file=_optional(cfg.clip_score.weights_file, Path),
        ),
        adherence=adherence,
        reconstruction_images=_optional(
            cfg.reconstruction.num_images, lambda v: _positive_int("reconstruction.num_images", v)
        ),
        out_dir=Path(cfg.out_dir),
        progress=bool(cfg.progress),
    )


def read_captions_file(path: Path) -> list[str]:
    """One caption per non-blank line."""
    captions = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    captions = [caption for caption in captions if caption]
    if not captions:
        raise EvaluationError(
            f"captions_file={path} holds no captions (only blank lines); give one per line."
        )
    return captions


def _metrics(value: Any) -> tuple[str, ...]:
    names = [value] if isinstance(value, str) else _list("metrics", value)
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise EvaluationError(
            f"Unknown metric(s) {unknown}; choose from {', '.join(METRICS)}, e.g. "
            "metrics=[fid,clip_score] for a U-Net or metrics=[reconstruction] for a VAE."
        )
    return tuple(dict.fromkeys(names))


def _list(name: str, value: Any) -> list[Any]:
    if not isinstance(value, list | tuple | ListConfig) or not len(value):
        raise EvaluationError(f"{name} must be a non-empty list, e.g. {name}=[...]; got {value!r}.")
    return list(
        OmegaConf.to_container(value, resolve=True) if isinstance(value, ListConfig) else value
    )


def _optional(value: Any, parse: Any) -> Any:
    return None if value is None else parse(value)


def _resolution(value: Any) -> int:
    pixels = _positive_int("resolution", value)
    if pixels < 16:
        raise EvaluationError(f"resolution={pixels} px is too small to judge images; use ≥ 16.")
    return pixels


def _positive_int(name: str, value: int) -> int:
    """Counts must be ≥ 1; that they are integers, the config schema has checked."""
    if value < 1:
        raise EvaluationError(f"{name} must be at least 1, got {value}.")
    return value
