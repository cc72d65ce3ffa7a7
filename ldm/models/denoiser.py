"""The stage-2 denoiser by name: `model.denoiser` picks the U-Net or the DiT.

Both take `(x_t, t, context)` and return a tensor shaped like `x_t`, so everything around them
(training, EMA, exports, sampling) holds either. Training and the export loader build them
here, from the name and the config section an export records beside the weights.
"""

from collections.abc import Mapping
from typing import Any

from torch import nn

from ldm.models.dit import DiT, DiTConfig
from ldm.models.unet import UNet, UNetConfig

# name → (config class, model class); the name is `model.denoiser`, the export's `denoiser`
# and the config section (`model.unet`, `model.dit`).
DENOISERS: dict[str, tuple[type, type[nn.Module]]] = {
    "unet": (UNetConfig, UNet),
    "dit": (DiTConfig, DiT),
}
# What an export written before the DiT existed holds.
DEFAULT_DENOISER = "unet"

Denoiser = UNet | DiT
DenoiserConfig = UNetConfig | DiTConfig


def denoiser_config(name: str, values: Mapping[str, Any]) -> DenoiserConfig:
    """The checked config of denoiser ``name`` from its plain section (``model.<name>``)."""
    if name not in DENOISERS:
        raise ValueError(
            f"Unknown denoiser {name!r}: model.denoiser must be one of {sorted(DENOISERS)} "
            "(unet: the convolutional U-Net; dit: the transformer)."
        )
    config_class, _ = DENOISERS[name]
    return config_class.from_dict(dict(values))


def build_denoiser(name: str, values: Mapping[str, Any]) -> Denoiser:
    """A freshly initialised denoiser ``name`` (``unet`` | ``dit``) built from its config."""
    config = denoiser_config(name, values)
    _, model_class = DENOISERS[name]
    return model_class(config)


def denoiser_name(model: nn.Module) -> str:
    """The name under which ``model``'s kind is built and recorded in exports."""
    for name, (_, model_class) in DENOISERS.items():
        if type(model) is model_class:
            return name
    raise TypeError(
        f"{type(model).__name__} is not a denoiser this project builds; expected one of "
        f"{[model_class.__name__ for _, model_class in DENOISERS.values()]}."
    )
