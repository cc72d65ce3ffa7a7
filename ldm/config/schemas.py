"""Every key of every entry script's config and its type, registered in Hydra's ConfigStore.

Each top-level YAML names its schema first in its defaults list (``- train_vae_schema``), so
Hydra merges every YAML file and override into these typed nodes: a key no schema names, or a
value of the wrong type, fails when the config is composed, whichever file or override it came
from. The values and their comments stay in ``conf/``: a field here has no default (``MISSING``)
unless no YAML file sets it. Importing this module registers the schemas; every script that
composes a config imports it first.

A key added with ``+`` passes Hydra (it forces the key in); ``ldm.config.checks`` refuses it
against these same schemas.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# ---- groups every entry script has -----------------------------------------------------------


@dataclass
class PathsSchema:
    root_dir: str = MISSING
    data_dir: str = MISSING
    runs_dir: str = MISSING
    cache_dir: str = MISSING


@dataclass
class SplitFilesSchema:
    annotations: str = MISSING
    images: str = MISSING


@dataclass
class SyntheticSchema:
    num_train: int = MISSING
    num_val: int = MISSING
    num_heldout: int = MISSING
    image_size_px: int = MISSING
    heldout_fraction: float = MISSING
    seed: int = MISSING
    variant: str = MISSING


@dataclass
class DataSchema:
    source: str = MISSING
    root: str = MISSING
    train: SplitFilesSchema = field(default_factory=SplitFilesSchema)
    val: SplitFilesSchema | None = MISSING
    val_fraction: float | None = MISSING
    image_size: int = MISSING
    subset: int | None = MISSING
    val_subset: int | None = MISSING
    batch_size: int = MISSING
    hflip: bool = MISSING
    on_bad_input: str = MISSING
    verify_images: bool = MISSING
    image_cache: str | bool = MISSING  # YAML reads a bare on/off as a boolean
    synthetic: SyntheticSchema | None = None  # set by data=synthetic alone


@dataclass
class VAESchema:
    in_channels: int = MISSING
    latent_channels: int = MISSING
    block_channels: list[int] = MISSING
    layers_per_block: int = MISSING
    mid_attention: bool = MISSING
    norm_groups: int = MISSING
    logvar_min: float = MISSING
    logvar_max: float = MISSING


@dataclass
class UNetSchema:
    in_channels: int = MISSING
    out_channels: int = MISSING
    model_channels: int = MISSING
    channel_multipliers: list[int] = MISSING
    res_blocks_per_level: int = MISSING
    transformer_levels: list[int] = MISSING
    transformer_depth: int = MISSING
    attention_head_dim: int = MISSING
    context_dim: int = MISSING
    dropout: float = MISSING
    norm_groups: int = MISSING
    pooled_text: bool = MISSING
    text_refiner_layers: int = MISSING


@dataclass
class DiTSchema:
    in_channels: int = MISSING
    out_channels: int = MISSING
    patch_size: int = MISSING
    hidden_dim: int = MISSING
    depth: int = MISSING
    attention_head_dim: int = MISSING
    context_dim: int = MISSING
    dropout: float = MISSING
    text_refiner_layers: int = MISSING
    pooled_text: bool = MISSING


@dataclass
class ModelSchema:
    vae: VAESchema = field(default_factory=VAESchema)
    denoiser: str = MISSING  # unet | dit: which of the two sections below stage 2 trains
    unet: UNetSchema = field(default_factory=UNetSchema)
    dit: DiTSchema = field(default_factory=DiTSchema)


@dataclass
class DeviceProfileSchema:
    precision: str = MISSING
    num_workers: int = MISSING
    pin_memory: bool = MISSING
    persistent_workers: bool = MISSING
    compile: str = MISSING
    fused_optimizer: bool = MISSING
    tf32: bool = MISSING
    cudnn_benchmark: bool = MISSING
    channels_last: bool = MISSING


@dataclass
class DeviceProfilesSchema:
    cuda: DeviceProfileSchema = field(default_factory=DeviceProfileSchema)
    mps: DeviceProfileSchema = field(default_factory=DeviceProfileSchema)
    cpu: DeviceProfileSchema = field(default_factory=DeviceProfileSchema)


@dataclass
class TrainerSchema:
    device: str = MISSING
    precision: str | None = MISSING
    num_workers: int | None = MISSING
    compile: str | None = MISSING
    strategy: str = MISSING
    devices: int | str = MISSING  # a count, or auto
    num_nodes: int = MISSING
    accumulate_grad_batches: int = MISSING
    prepare_data_per_node: bool = MISSING
    max_epochs: int = MISSING
    max_steps: int = MISSING
    gradient_clip_val: float | None = MISSING
    log_every_n_steps: int = MISSING
    check_val_every_n_epoch: int = MISSING
    limit_train_batches: int | float | None = MISSING  # batches, or a fraction of them
    limit_val_batches: int | float | None = MISSING
    fast_dev_run: bool | int = MISSING
    deterministic: bool = MISSING
    checkpoint_every_n_steps: int = MISSING
    max_consecutive_nonfinite: int | None = MISSING
    profiles: DeviceProfilesSchema = field(default_factory=DeviceProfilesSchema)


@dataclass
class LoggerSchema:
    """``kind`` picks the logger; the other keys are W&B's. conf/logger/wandb.yaml sets them;
    the defaults here are what logger=csv and logger=none carry, unread."""

    kind: str = MISSING
    project: str | None = None
    entity: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    offline: bool = False
    id: str | None = None


@dataclass
class RunSchema:
    """What every entry script's config has."""

    stage: str = MISSING
    paths: PathsSchema = field(default_factory=PathsSchema)
    data: DataSchema = field(default_factory=DataSchema)
    model: ModelSchema = field(default_factory=ModelSchema)
    trainer: TrainerSchema = field(default_factory=TrainerSchema)
    logger: LoggerSchema = field(default_factory=LoggerSchema)


# ---- training ----------------------------------------------------------------------------------


@dataclass
class OptimSchema:
    lr: float = MISSING
    weight_decay: float = MISSING
    betas: list[float] = MISSING
    lr_warmup_steps: int = MISSING
    lr_schedule: str = MISSING
    min_lr_ratio: float = MISSING


@dataclass
class VAELossSchema:
    kl_weight: float = MISSING


@dataclass
class LatentStatsSchema:
    max_batches: int | None = MISSING


@dataclass
class ImageLoggingSchema:
    num_images: int = MISSING


@dataclass
class TrainVAESchema(RunSchema):
    seed: int = MISSING
    train: bool = MISSING
    ckpt_path: str | None = MISSING
    optim: OptimSchema = field(default_factory=OptimSchema)
    loss: VAELossSchema = field(default_factory=VAELossSchema)
    latent_stats: LatentStatsSchema = field(default_factory=LatentStatsSchema)
    logging: ImageLoggingSchema = field(default_factory=ImageLoggingSchema)


@dataclass
class DiffusionSchema:
    objective: str = MISSING
    num_train_timesteps: int = MISSING
    beta_schedule: str = MISSING
    beta_start: float | None = MISSING
    beta_end: float | None = MISSING
    rescale_zero_terminal_snr: bool = MISSING
    prediction_type: str = MISSING
    loss_weighting: str = MISSING
    min_snr_gamma: float = MISSING
    flow_logit_mean: float = MISSING
    flow_logit_std: float = MISSING
    flow_shift: float = MISSING
    noise_offset: float = MISSING
    input_perturbation: float = MISSING


@dataclass
class TextEncoderSchema:
    model_name: str = MISSING
    pretrained: str | None = MISSING
    weights_file: str | None = MISSING
    max_length: int = MISSING
    seed: int = MISSING
    clip_skip: int = MISSING


@dataclass
class CacheSchema:
    dir: str = MISSING
    policy: str = MISSING
    batch_size: int = MISSING
    text_max_positions: int | None = MISSING
    device: str = MISSING


@dataclass
class EMASchema:
    decay_max: float = MISSING
    warmup_inv_gamma: float = MISSING
    warmup_power: float = MISSING
    update_every: int = MISSING


@dataclass
class SamplingSchema:
    sampler: str | None = MISSING
    steps: int = MISSING
    cfg_scale: float = MISSING
    eta: float = MISSING
    guidance_interval: Any = None  # null or [low, high] (either may be null)


@dataclass
class ValidationSchema:
    timestep_buckets: int = MISSING
    sample_every_n_epochs: int = MISSING
    seed: int = MISSING
    prompts: list[str] = MISSING
    sampling: SamplingSchema = field(default_factory=SamplingSchema)


@dataclass
class FIDSchema:
    feature_dim: int = MISSING
    weights_file: str | None = MISSING


@dataclass
class EvaluationCurvesSchema:
    every_n_steps: int | None = MISSING
    prompts_per_split: int = MISSING
    images_per_prompt: int = MISSING
    fid_k: int | None = MISSING
    fid: FIDSchema = field(default_factory=FIDSchema)
    seed: int = MISSING
    sampling: SamplingSchema = field(default_factory=SamplingSchema)


@dataclass
class TrainUNetSchema(RunSchema):
    seed: int = MISSING
    ckpt_path: str | None = MISSING
    vae_export: str = MISSING
    optim: OptimSchema = field(default_factory=OptimSchema)
    cond_dropout: float = MISSING
    latent_norm: str = MISSING
    ema: EMASchema = field(default_factory=EMASchema)
    validation: ValidationSchema = field(default_factory=ValidationSchema)
    evaluation: EvaluationCurvesSchema = field(default_factory=EvaluationCurvesSchema)
    diffusion: DiffusionSchema = field(default_factory=DiffusionSchema)
    text_encoder: TextEncoderSchema = field(default_factory=TextEncoderSchema)
    cache: CacheSchema = field(default_factory=CacheSchema)


# ---- sampling and evaluation ------------------------------------------------------------------


@dataclass
class SampleSchema(RunSchema):
    ckpt: str = MISSING
    weights: str = MISSING
    vae_export: str | None = MISSING
    prompt: Any = MISSING  # one prompt, a list of them, or null
    prompts_file: str | None = MISSING
    negative_prompt: str = MISSING
    n: int = MISSING
    batch_size: int = MISSING
    seed: int = MISSING
    sampler: str | None = MISSING
    steps: int = MISSING
    cfg_scale: float = MISSING
    guidance_interval: Any = MISSING  # null or [low, high] (either may be null)
    eta: float = MISSING
    init_image: str | None = MISSING
    strength: float | None = MISSING
    out_dir: str = MISSING
    offload: bool = MISSING
    progress: bool = MISSING
    compile: str = MISSING


@dataclass
class ClipScoreSchema:
    model_name: str = MISSING
    pretrained: str | None = MISSING
    weights_file: str | None = MISSING


@dataclass
class AdherenceSchema:
    prompts: int = MISSING
    images_per_prompt: int = MISSING
    vae_ceiling_images: int = MISSING
    analyser_check_images: int = MISSING


@dataclass
class ReconstructionSchema:
    num_images: int | None = MISSING


@dataclass
class EvaluateSchema(RunSchema):
    metrics: Any = MISSING  # a list of metric names, or one name
    ckpt: str = MISSING
    weights: str = MISSING
    vae_export: str | None = MISSING
    sampler: str | None = MISSING
    eta: float = MISSING
    cfg_scales: list[float] = MISSING
    guidance_interval: Any = MISSING  # null or [low, high] (either may be null)
    steps: list[int] = MISSING
    seed: int = MISSING
    batch_size: int = MISSING
    num_samples: int = MISSING
    captions_file: str | None = MISSING
    num_real_images: int | None = MISSING
    resolution: int | None = MISSING
    fid: FIDSchema = field(default_factory=FIDSchema)
    clip_score: ClipScoreSchema = field(default_factory=ClipScoreSchema)
    adherence: AdherenceSchema = field(default_factory=AdherenceSchema)
    reconstruction: ReconstructionSchema = field(default_factory=ReconstructionSchema)
    out_dir: str = MISSING
    progress: bool = MISSING


# The schema of each entry script's config, by the config's ``stage`` key.
SCHEMAS_BY_STAGE: dict[str, type[RunSchema]] = {
    "vae": TrainVAESchema,
    "unet": TrainUNetSchema,
    "sample": SampleSchema,
    "evaluate": EvaluateSchema,
}

_store = ConfigStore.instance()
_store.store(name="train_vae_schema", node=TrainVAESchema)
_store.store(name="train_unet_schema", node=TrainUNetSchema)
_store.store(name="sample_schema", node=SampleSchema)
_store.store(name="evaluate_schema", node=EvaluateSchema)
