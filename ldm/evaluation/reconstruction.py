"""How much of an image survives the VAE: PSNR, SSIM, LPIPS and rFID on the validation split.

Each image is encoded to its posterior mean (no sampled noise, so the numbers are
deterministic), decoded and quantised to 8 bits like a saved PNG. PSNR and SSIM are the mean of
per-image values on [0, 1] pixels; LPIPS is torchmetrics' AlexNet LPIPS (lower is closer), which
needs torchvision's ImageNet AlexNet weights — when those cannot be loaded (offline) it is
recorded as unavailable with the reason, never estimated another way. rFID is the FID between
the validation images and their reconstructions: the floor under any generated-image FID.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torchmetrics.image import (
    LearnedPerceptualImagePatchSimilarity,
    PeakSignalNoiseRatio,
    StructuralSimilarityIndexMeasure,
)
from torchmetrics.image.fid import FrechetInceptionDistance

from ldm.data.transforms import model_tensor_to_uint8, to_model_range
from ldm.evaluation.errors import one_line
from ldm.evaluation.fid import fid_value
from ldm.models.vae import VAE

LPIPS_NETWORK = "alex"  # torchmetrics' default, as in the LPIPS paper's recommended variant
LPIPS_MIN_RESOLUTION_PX = 32  # AlexNet's strided convolution and pools need 31 px and more


@dataclass(frozen=True)
class ReconstructionScores:
    psnr_db: float
    ssim: float
    lpips: float | None  # None when LPIPS's network weights could not be loaded
    lpips_unavailable: str | None  # why, when lpips is None
    rfid: float
    num_images: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "psnr_db": self.psnr_db,
            "ssim": self.ssim,
            "lpips": self.lpips,
            "lpips_unavailable": self.lpips_unavailable,
            "rfid": self.rfid,
            "num_images": self.num_images,
        }


def build_lpips() -> LearnedPerceptualImagePatchSimilarity:
    """AlexNet LPIPS on [0, 1] images; building it loads (or downloads) the AlexNet weights."""
    return LearnedPerceptualImagePatchSimilarity(net_type=LPIPS_NETWORK, normalize=True)


def lpips_or_reason(
    resolution_px: int,
) -> tuple[LearnedPerceptualImagePatchSimilarity | None, str | None]:
    """The LPIPS metric, or None and why it cannot be had (its weights are downloaded once)."""
    if resolution_px < LPIPS_MIN_RESOLUTION_PX:
        return None, (
            f"AlexNet LPIPS needs images of at least {LPIPS_MIN_RESOLUTION_PX} px (its pooling "
            f"leaves nothing of {resolution_px} px); evaluate at a larger resolution="
        )
    try:
        return build_lpips(), None
    # torch.hub reports a failed download as URLError/HTTPError (OSErrors) or a RuntimeError.
    except (OSError, RuntimeError) as error:
        cache_dir = f"{torch.hub.get_dir()}/checkpoints"
        return None, (
            f"torchvision's AlexNet weights could not be loaded ({one_line(error)}); they are "
            f"downloaded once from the internet into {cache_dir}: run the evaluation once with "
            "network access, or copy that folder from a machine that has run it."
        )


@torch.no_grad()
def reconstruct(vae: VAE, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, R, R) uint8 → the VAE's reconstruction of the posterior mean, uint8."""
    device = next(vae.parameters()).device
    images = to_model_range(pixels.to(device))
    return model_tensor_to_uint8(vae.decode(vae.encode(images).mode()))


@torch.no_grad()
def measure_reconstruction(
    vae: VAE, batches: Iterable[torch.Tensor], fid: FrechetInceptionDistance, resolution_px: int
) -> ReconstructionScores:
    """Score the VAE on ``batches`` of uint8 validation images (B, 3, R, R), R = resolution_px."""
    device = next(vae.parameters()).device
    psnr = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3)).to(device)
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0).to(device)
    lpips, lpips_unavailable = lpips_or_reason(resolution_px)
    if lpips is not None:
        lpips = lpips.to(device)
    count = 0
    for pixels in batches:
        originals = pixels.to(device)
        reconstructions = reconstruct(vae, originals)
        fid.update(originals.to(fid.device), real=True)
        fid.update(reconstructions.to(fid.device), real=False)
        originals, reconstructions = originals.float() / 255, reconstructions.float() / 255
        psnr.update(reconstructions, originals)
        ssim.update(reconstructions, originals)
        if lpips is not None:
            lpips.update(reconstructions, originals)
        count += pixels.shape[0]
    return ReconstructionScores(
        psnr_db=float(psnr.compute()),
        ssim=float(ssim.compute()),
        lpips=None if lpips is None else float(lpips.compute()),
        lpips_unavailable=lpips_unavailable,
        rfid=fid_value(fid),
        num_images=count,
    )
