"""Building a clean list of (image file, captions) records from a COCO captions annotation file.

Everything that would crash an epoch later — missing, empty, corrupt or non-image files, images
without captions, captions of unknown images — is found here, once, and reported together.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pycocotools.coco import COCO
from tqdm.auto import tqdm

from ldm.data.bad_input import BadInputReport
from ldm.data.image_check_cache import ImageCheckCache
from ldm.data.images import ImageReadError, read_rgb_image

DOWNLOAD_HINT = "Run `make coco` to download COCO 2017, or point data.root at your copy."
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class CaptionedImage:
    """One usable image and every caption written for it."""

    image_id: int
    path: Path
    captions: tuple[str, ...]


def normalise_caption(caption: str) -> str:
    """Collapse whitespace runs and newlines: COCO captions carry stray spaces and line breaks."""
    return _WHITESPACE.sub(" ", caption).strip()


def _load_coco(annotation_file: Path) -> COCO:
    if not annotation_file.is_file():
        raise FileNotFoundError(f"COCO captions file not found: {annotation_file}. {DOWNLOAD_HINT}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints timing chatter
            return COCO(str(annotation_file))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{annotation_file} is not valid JSON ({error}). Re-download it with `make coco`."
        ) from error
    except (KeyError, TypeError, AssertionError) as error:
        raise ValueError(
            f"{annotation_file} is not a COCO captions file (needs 'images' and 'annotations' "
            f"lists): {error!r}"
        ) from error


def _check_image_file(path: Path) -> str | None:
    """Return why ``path`` is unusable, or None when it decodes."""
    if not path.is_file():
        return "image listed but absent"
    if path.stat().st_size == 0:
        return "zero-byte image file"
    try:
        # A reduced-size decode still reads the whole stream, so truncation is caught cheaply.
        read_rgb_image(path, min_size_px=64)
    except ImageReadError:
        return "corrupt, truncated or non-image file"
    return None


def build_caption_index(
    annotation_file: str | Path,
    image_dir: str | Path,
    *,
    subset: int | None = None,
    verify_images: bool = True,
    check_cache_dir: Path | None = None,
    num_threads: int = 4,
) -> tuple[list[CaptionedImage], BadInputReport]:
    """Read a COCO captions file and keep the images that can really be trained on.

    ``subset`` keeps the first N images in file order (as the seed's 40k-image run did) and is
    applied before checking, so a small subset of a large split is quick to open.
    """
    annotation_file, image_dir = Path(annotation_file), Path(image_dir)
    coco = _load_coco(annotation_file)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"COCO image folder not found: {image_dir}. {DOWNLOAD_HINT}")
    report = BadInputReport(source=str(annotation_file))

    known_ids = set(coco.imgs)
    for annotation in coco.dataset.get("annotations", []):
        if annotation.get("image_id") not in known_ids:
            report.add("caption pointing to an unknown image", f"annotation {annotation.get('id')}")

    image_ids = list(coco.imgs)
    if subset is not None:
        if subset < 1:
            raise ValueError(f"data.subset must be a positive number of images, got {subset}")
        image_ids = image_ids[:subset]

    candidates: list[CaptionedImage] = []
    for image_id in image_ids:
        captions = tuple(
            text
            for annotation in coco.imgToAnns.get(image_id, [])
            if (text := normalise_caption(str(annotation.get("caption", ""))))
        )
        file_name = coco.imgs[image_id].get("file_name", f"<id {image_id}>")
        if not captions:
            report.add("image without captions", file_name)
            continue
        candidates.append(CaptionedImage(int(image_id), image_dir / file_name, captions))

    problems = _check_files(candidates, verify_images, check_cache_dir, num_threads)
    records = []
    for record, problem in zip(candidates, problems, strict=True):
        if problem is None:
            records.append(record)
        else:
            report.add(problem, record.path.name)
    return records, report


def _check_files(
    records: list[CaptionedImage],
    verify_images: bool,
    check_cache_dir: Path | None,
    num_threads: int,
) -> list[str | None]:
    if not verify_images:
        return [None if r.path.is_file() else "image listed but absent" for r in records]
    cache = ImageCheckCache(check_cache_dir) if check_cache_dir else None
    paths = [r.path for r in records]
    known = cache.lookup(paths) if cache else {}
    todo = [p for p in paths if p not in known]
    if todo:
        with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
            results = pool.map(_check_image_file, todo)
            for path, problem in tqdm(
                zip(todo, results, strict=True),
                total=len(todo),
                desc="Checking images",
                dynamic_ncols=True,
            ):
                known[path] = problem
        if cache:
            cache.store({p: known[p] for p in todo})
    return [known[p] for p in paths]
