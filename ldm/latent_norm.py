"""The map between the frozen VAE's latents and the space the diffusion model works in.

The noise schedule assumes unit-variance data, so stage 2 normalises the VAE's latents with
statistics measured on them in stage 1 (the VAE export's ``latent_stats``), and sampling undoes
that before decoding. Two kinds (``latent_norm`` in train_unet.yaml):

* ``global``: ``z · scale_factor`` with ``scale_factor = 1 / std`` over all channels (Stable
  Diffusion 1/2's scheme, but measured on our own VAE).
* ``per_channel``: ``(z_c − channel_mean_c) / channel_std_c`` for each channel c (SD3's and
  FLUX's shift and scale; diffusers' ``latents_mean`` / ``latents_std``). One global scale leaves
  a channel with a small spread nearly drowned: a 128 px VAE with channel stds 0.15, 0.61, 0.81,
  1.00 gives channel 0 a signal-to-noise ratio 44× below channel 3's at every noise level.

Both are ``normalize(z) = (z − shift) · scale`` and ``denormalize(x) = x / scale + shift``; for
``global`` the shift is 0, so its results are bit for bit those of ``z · scale_factor``. The
transform is described by a small JSON dict (``describe()``) that the U-Net export records, so
sampling applies exactly what training did.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

LATENT_NORM_KINDS = ("global", "per_channel")
_KIND_MEANINGS = (
    "global multiplies every latent by the VAE export's scale_factor (1/std over all channels); "
    "per_channel shifts and scales each channel by its own mean and std"
)


class LatentNormalizer(nn.Module):
    """``normalize`` VAE latents for the diffusion model, ``denormalize`` its samples for the VAE.

    Built from a description (``{"kind": "global", "scale_factor": s}`` or ``{"kind":
    "per_channel", "channel_mean": [...], "channel_std": [...]}``), checked once here. The shift
    and scale are non-persistent buffers: they follow the module to its device, stay out of
    state dicts (the description travels in hyperparameters and exports instead) and cost no
    host sync in a step.
    """

    shift: Tensor  # (C, 1, 1), or (1, 1, 1) for global
    scale: Tensor

    def __init__(self, description: Mapping[str, Any], *, latent_channels: int | None = None):
        super().__init__()
        self._description = _checked(description, latent_channels)
        if self.kind == "global":
            shift, scale = [0.0], [self._description["scale_factor"]]
        else:
            shift = self._description["channel_mean"]
            scale = [1.0 / std for std in self._description["channel_std"]]
        self.register_buffer("shift", _per_channel_column(shift), persistent=False)
        self.register_buffer("scale", _per_channel_column(scale), persistent=False)

    @classmethod
    def from_latent_stats(
        cls, kind: str, latent_stats: Mapping[str, Any], *, latent_channels: int
    ) -> LatentNormalizer:
        """The ``kind`` normaliser from a VAE export's ``latent_stats`` (stage 1's measurement),
        refused when those lack what ``kind`` needs or describe another channel count."""
        _check_kind(kind)
        needed = ("scale_factor",) if kind == "global" else ("channel_mean", "channel_std")
        missing = [key for key in needed if key not in latent_stats]
        if missing:
            raise ValueError(
                f"The VAE export's latent_stats lack {missing}, which latent_norm={kind} needs. "
                "Measure them again with `python train_vae.py train=false "
                "ckpt_path=<that VAE's checkpoint>`"
                + (", or use latent_norm=global." if kind == "per_channel" else ".")
            )
        description = {"kind": kind, **{key: latent_stats[key] for key in needed}}
        return cls(description, latent_channels=latent_channels)

    @classmethod
    def global_scale(cls, scale_factor: float) -> LatentNormalizer:
        """Every latent times ``scale_factor``, no shift."""
        return cls({"kind": "global", "scale_factor": scale_factor})

    @property
    def kind(self) -> str:
        return self._description["kind"]

    def describe(self) -> dict[str, Any]:
        """The plain-JSON description this normaliser was built from (what exports record)."""
        return copy.deepcopy(self._description)

    def normalize(self, latents: Tensor) -> Tensor:
        """VAE latents (..., C, h, w) → the diffusion model's space: ``(z − shift) · scale``."""
        shift, scale = self._on(latents)
        return (latents - shift) * scale

    def denormalize(self, latents: Tensor) -> Tensor:
        """The diffusion model's latents (..., C, h, w) → the VAE's: ``x / scale + shift``."""
        shift, scale = self._on(latents)
        return latents / scale + shift

    def _on(self, latents: Tensor) -> tuple[Tensor, Tensor]:
        # No-ops once the module sits on the latents' device in their dtype (the usual case).
        return self.shift.to(latents), self.scale.to(latents)

    def extra_repr(self) -> str:
        return f"kind={self.kind}"


def _per_channel_column(values: list[float]) -> Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(-1, 1, 1)  # (C, 1, 1)


def _check_kind(kind: Any) -> None:
    if kind not in LATENT_NORM_KINDS:
        raise ValueError(
            f"latent_norm={kind!r} is not one of {' | '.join(LATENT_NORM_KINDS)}: {_KIND_MEANINGS}."
        )


def _checked(description: Mapping[str, Any], latent_channels: int | None) -> dict[str, Any]:
    """``description`` as plain floats, refused unless it defines an invertible transform."""
    if not isinstance(description, Mapping):
        raise ValueError(
            f"A latent normalisation is described by a dict with a 'kind', got {description!r}."
        )
    kind = description.get("kind")
    _check_kind(kind)
    if kind == "global":
        scale_factor = _number(description, "scale_factor")
        if not math.isfinite(scale_factor) or scale_factor <= 0:
            raise ValueError(
                f"scale_factor={scale_factor} must be finite and positive: it is 1/std of the "
                "VAE's latents. Measure the VAE's latent statistics again."
            )
        return {"kind": kind, "scale_factor": scale_factor}
    means, stds = _numbers(description, "channel_mean"), _numbers(description, "channel_std")
    if len(means) != len(stds) or not means:
        raise ValueError(
            f"channel_mean has {len(means)} values and channel_std {len(stds)}: both need one "
            "per latent channel. The latent statistics are corrupt; measure them again."
        )
    if latent_channels is not None and len(means) != latent_channels:
        raise ValueError(
            f"The latent statistics describe {len(means)} channels, but the latents have "
            f"{latent_channels}: they were measured on another VAE. Use the statistics of the "
            "VAE export that encodes these latents."
        )
    bad_means = [i for i, mean in enumerate(means) if not math.isfinite(mean)]
    bad_stds = [i for i, std in enumerate(stds) if not (math.isfinite(std) and std > 0)]
    if bad_means or bad_stds:
        raise ValueError(
            f"latent_norm=per_channel needs finite channel means and finite, positive channel "
            f"stds, got channel_mean {means} and channel_std {stds} (channels "
            f"{sorted(set(bad_means + bad_stds))}). A zero std is a constant channel, which no "
            "scale makes unit-variance: use latent_norm=global, or measure the VAE's latent "
            "statistics again if they are corrupt."
        )
    return {"kind": kind, "channel_mean": means, "channel_std": stds}


def _number(description: Mapping[str, Any], key: str) -> float:
    value = description.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(
            f"latent_norm={description.get('kind')} needs a number {key}, got {value!r}."
        )
    return float(value)


def _numbers(description: Mapping[str, Any], key: str) -> list[float]:
    values = description.get(key)
    if not isinstance(values, list | tuple) or any(
        isinstance(value, bool) or not isinstance(value, int | float) for value in values
    ):
        raise ValueError(
            f"latent_norm={description.get('kind')} needs {key} as a list of numbers (one per "
            f"channel), got {values!r}."
        )
    return [float(value) for value in values]
