"""``sample.py``'s machinery: check the request, generate, write PNGs.

Trained U-Nets are found and loaded safely by ``ldm.exports``; the images themselves come from
``ldm.pipeline`` — the same path the training grids use.
"""

from ldm.sampling.errors import SamplingError
from ldm.sampling.outputs import labelled_grid, read_png_metadata, save_png
from ldm.sampling.request import ImageJob, SampleRequest, request_from_config
from ldm.sampling.run import (
    SamplingResult,
    load_matching_vae,
    load_sampling_checkpoint,
    run_sampling,
)

__all__ = [
    "ImageJob",
    "SampleRequest",
    "SamplingError",
    "SamplingResult",
    "labelled_grid",
    "load_matching_vae",
    "load_sampling_checkpoint",
    "read_png_metadata",
    "request_from_config",
    "run_sampling",
    "save_png",
]
