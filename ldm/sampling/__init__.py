"""``sample.py``'s machinery: load a trained U-Net checkpoint safely, generate, write PNGs.

The images themselves come from ``ldm.pipeline`` — the same path the training grids use.
"""

from ldm.sampling.checkpoint import (
    SamplingCheckpoint,
    load_matching_vae,
    load_sampling_checkpoint,
    locate_checkpoint,
)
from ldm.sampling.errors import SamplingError
from ldm.sampling.outputs import labelled_grid, read_png_metadata, save_png
from ldm.sampling.request import ImageJob, SampleRequest, request_from_config
from ldm.sampling.run import SamplingResult, run_sampling

__all__ = [
    "ImageJob",
    "SampleRequest",
    "SamplingCheckpoint",
    "SamplingError",
    "SamplingResult",
    "labelled_grid",
    "load_matching_vae",
    "load_sampling_checkpoint",
    "locate_checkpoint",
    "read_png_metadata",
    "request_from_config",
    "run_sampling",
    "save_png",
]
