"""Download, verify and unpack MS-COCO 2017 images and caption annotations (`make coco`).

Why not `wget && unzip`: the train archive is 19 GB, so a dropped connection must resume instead
of starting over, a truncated or corrupted archive must never turn into a dataset that merely looks
complete, and running `make coco` again must be a quick check rather than a second download.

    python -m ldm.data.coco_download --root data/coco [--splits train val] [--only-annotations]

Archives go to ``<root>/downloads/`` (as ``<name>.part`` until complete and verified); an archive
placed there by hand is verified and used instead of downloading. Each archive unpacks to one
directory under ``<root>``: ``train2017/``, ``val2017/`` and ``annotations/`` (which holds
``captions_{train,val}2017.json``).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import shutil
import sys
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from tqdm import tqdm

# Plain http, as the COCO download page links it: integrity comes from the MD5 check below, and
# --base-url accepts a mirror that serves the same paths.
OFFICIAL_BASE_URL = "http://images.cocodataset.org"
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60
GB = 1e9


@dataclass(frozen=True)
class Archive:
    """One COCO archive: where it lives, what it must hash to, and what it unpacks to."""

    url_path: str
    size: int
    md5: str
    unpacks_to: str
    file_count: int
    unpacked_bytes: int  # an estimate, used only to check free disk space up front

    @property
    def filename(self) -> str:
        return self.url_path.rsplit("/", 1)[-1]


# Byte sizes: tensorflow/datasets, tensorflow_datasets/url_checksums/coco.txt.
# MD5s: PaddlePaddle/PaddleDetection, ppdet/utils/download.py (DATASETS["coco"]); the same three
# digests appear in many independent COCO download scripts.
# File counts: 118287 train and 5000 val images; the annotations archive holds six JSON files
# (captions, instances and person_keypoints, each for train and val).
# Unpacked sizes: JPEGs do not compress further, so images take about their archive's size; the
# six annotation JSONs take about 0.84 GB. Rounded up.
COCO_ARCHIVES: dict[str, Archive] = {
    "annotations": Archive(
        url_path="annotations/annotations_trainval2017.zip",
        size=252_907_541,
        md5="f4bbac642086de4f52a3fdda2de5fa2c",
        unpacks_to="annotations",
        file_count=6,
        unpacked_bytes=850_000_000,
    ),
    "val": Archive(
        url_path="zips/val2017.zip",
        size=815_585_330,
        md5="442b8da7639aecaf257c1dceb8ba8c80",
        unpacks_to="val2017",
        file_count=5_000,
        unpacked_bytes=830_000_000,
    ),
    "train": Archive(
        url_path="zips/train2017.zip",
        size=19_336_861_798,
        md5="cced6f7f71b7629ddf16f17bbcfab6b2",
        unpacks_to="train2017",
        file_count=118_287,
        unpacked_bytes=19_500_000_000,
    ),
}


class CocoDownloadError(Exception):
    """An expected failure (network, disk space, checksum): shown to the user without traceback."""


def select_archives(
    table: Mapping[str, Archive], splits: Sequence[str], only_annotations: bool
) -> list[Archive]:
    """Annotations always, image splits on request; table order puts the small archives first."""
    wanted = {"annotations"} if only_annotations else {"annotations", *splits}
    return [archive for name, archive in table.items() if name in wanted]


def count_files(directory: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(directory))


def file_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def part_path(archive_path: Path) -> Path:
    return archive_path.with_name(archive_path.name + ".part")


def is_unpacked(archive: Archive, root: Path) -> bool:
    """Whether the archive's directory is in place.

    The directory only appears through a rename after a complete unpack, so its presence means
    done; a quick file count still catches copies damaged or trimmed since then.
    """
    target = root / archive.unpacks_to
    if not target.exists():
        return False
    found = count_files(target)
    if found < archive.file_count:
        raise CocoDownloadError(
            f"{target} holds {found} files but {archive.filename} unpacks {archive.file_count}: "
            f"it is incomplete or was modified. Delete {target} and re-run `make coco`."
        )
    return True


def bytes_needed(archive: Archive, downloads: Path) -> int:
    """Disk space the archive still needs: the rest of its download plus its unpacked files."""
    final = downloads / archive.filename
    already = max(file_size(final), file_size(part_path(final)))
    return max(archive.size - already, 0) + archive.unpacked_bytes


def check_free_space(pending: Sequence[Archive], root: Path) -> None:
    """Fail before downloading anything rather than on a full disk halfway through 19 GB."""
    needed = sum(bytes_needed(archive, root / "downloads") for archive in pending)
    free = shutil.disk_usage(root).free
    if free < needed:
        names = ", ".join(archive.filename for archive in pending)
        raise CocoDownloadError(
            f"Not enough free disk space in {root.resolve()}: {needed / GB:.1f} GB needed for "
            f"{names} (download + unpacked files), only {free / GB:.1f} GB free. Free up space, "
            "or point --root (or a data/coco symlink) at a larger disk."
        )


def byte_bar(label: str, total: int, initial: int = 0) -> tqdm:
    """The project's tqdm style, counting bytes: downloads, checksums and unpacking take minutes."""
    return tqdm(
        total=total,
        initial=initial,
        desc=label,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        dynamic_ncols=True,
    )


def unreachable_message(url: str, reason: object, downloads: Path) -> str:
    host = urlsplit(url).netloc
    return (
        f"Could not reach {host} ({reason}). Check your network/proxy, or download {url} "
        f"manually into {downloads}/ and re-run `make coco` (data/README.md lists every archive)."
    )


def http_get(url: str, offset: int, downloads: Path) -> http.client.HTTPResponse:
    """GET url, asking for the bytes from ``offset`` on when there is a partial file to extend."""
    headers = {"User-Agent": "ldm-coco-downloader"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as error:
        raise CocoDownloadError(
            f"{urlsplit(url).netloc} answered HTTP {error.code} ({error.reason}) for {url}. "
            f"If this persists, download it manually into {downloads}/ and re-run `make coco`."
        ) from None
    except urllib.error.URLError as error:
        raise CocoDownloadError(unreachable_message(url, error.reason, downloads)) from None
    except (OSError, http.client.HTTPException) as error:  # e.g. timeout, garbled headers
        raise CocoDownloadError(unreachable_message(url, error, downloads)) from None


def resumed_from(response: http.client.HTTPResponse) -> int | None:
    """Where the response body starts in the file: the Content-Range start of a 206, else 0.

    A server that ignores Range answers 200 with the whole file, which must then replace the
    partial file rather than be appended to it.
    """
    if response.status != 206:
        return 0
    start = response.headers.get("Content-Range", "").removeprefix("bytes ").split("-", 1)[0]
    return int(start) if start.isdigit() else None


def announced_size(response: http.client.HTTPResponse) -> int | None:
    """Full size of the file as the server states it, from Content-Range or Content-Length."""
    if response.status == 206:
        total = response.headers.get("Content-Range", "").rpartition("/")[2]
        return int(total) if total.isdigit() else None
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def copy_body(
    response: http.client.HTTPResponse, destination: Path, start: int, total: int
) -> None:
    """Stream the body to destination (appending when resuming) with a progress bar."""
    mode = "ab" if start else "wb"
    label = f"Downloading {destination.name.removesuffix('.part')}"
    with destination.open(mode) as sink, byte_bar(label, total, initial=start) as bar:
        while chunk := response.read(CHUNK_BYTES):
            sink.write(chunk)
            bar.update(len(chunk))


def checked_start(
    response: http.client.HTTPResponse, url: str, destination: Path, expected_size: int
) -> int:
    """Where the body goes in destination, once the response is known to carry that archive."""
    offset = file_size(destination)
    start = resumed_from(response)
    if start not in (0, offset):
        raise CocoDownloadError(
            f"The server answered a request for {url} from byte {offset} with Content-Range "
            f"{response.headers.get('Content-Range')!r}. Delete {destination} and re-run "
            "`make coco`."
        )
    size = announced_size(response)
    if size is not None and size != expected_size:
        raise CocoDownloadError(
            f"The server's copy of {url} is {size} bytes, but the official archive is "
            f"{expected_size} bytes. It changed upstream or a proxy is interfering; download "
            f"it manually into {destination.parent}/ and re-run `make coco`."
        )
    if offset and not start:
        print(f"The server cannot resume {url}; downloading it from the start.")
    return start


def download(url: str, destination: Path, expected_size: int) -> None:
    """Fetch url into destination, continuing an earlier partial download where possible."""
    if file_size(destination) > expected_size:  # cannot be a prefix of this archive
        destination.unlink()
    offset = file_size(destination)
    if offset == expected_size:
        return
    with http_get(url, offset, destination.parent) as response:
        start = checked_start(response, url, destination, expected_size)
        try:
            copy_body(response, destination, start, expected_size)
        except (OSError, http.client.HTTPException) as error:
            raise CocoDownloadError(
                f"Downloading {url} stopped after {file_size(destination)} of {expected_size} "
                f"bytes ({error!r}). Re-run `make coco` to resume from there."
            ) from None
    if file_size(destination) < expected_size:
        raise CocoDownloadError(
            f"The connection closed after {file_size(destination)} of {expected_size} bytes of "
            f"{url}. Re-run `make coco` to resume from there."
        )


def md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    label = f"Verifying {path.name.removesuffix('.part')}"
    with path.open("rb") as source, byte_bar(label, path.stat().st_size) as bar:
        while chunk := source.read(CHUNK_BYTES):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def mismatch(path: Path, archive: Archive) -> str | None:
    """Why path is not the official archive, or None when it is (size first: it is instant)."""
    size = path.stat().st_size
    if size != archive.size:
        return f"it is {size} bytes, the official archive is {archive.size} bytes"
    digest = md5_of(path)
    if digest != archive.md5:
        return f"its MD5 is {digest}, the official archive's is {archive.md5}"
    return None


def obtain_archive(archive: Archive, base_url: str, downloads: Path) -> Path:
    """A verified archive in downloads/: one already there (e.g. placed by hand) or downloaded."""
    final = downloads / archive.filename
    if final.exists():
        problem = mismatch(final, archive)
        if problem:
            raise CocoDownloadError(
                f"{final} is not the official {archive.filename}: {problem}. It was left in "
                "place; delete or replace it, then re-run `make coco`."
            )
        return final
    partial = part_path(final)
    download(f"{base_url.rstrip('/')}/{archive.url_path}", partial, archive.size)
    problem = mismatch(partial, archive)
    if problem:
        partial.unlink()
        raise CocoDownloadError(
            f"The downloaded {archive.filename} is corrupt: {problem}. It was deleted; re-run "
            "`make coco` to download it again."
        )
    partial.replace(final)
    return final


def check_layout(members: Sequence[zipfile.ZipInfo], archive: Archive, path: Path) -> None:
    """Refuse archives that would unpack anywhere but their one expected directory."""
    prefix = f"{archive.unpacks_to}/"
    strays = [member.filename for member in members if not member.filename.startswith(prefix)]
    if strays:
        raise CocoDownloadError(
            f"{path} holds {strays[0]!r}, outside {prefix}: it is not the expected COCO archive. "
            "Delete it and re-run `make coco`."
        )


def extract_members(bundle: zipfile.ZipFile, destination: Path, label: str) -> None:
    members = bundle.infolist()
    with byte_bar(f"Unpacking {label}", sum(member.file_size for member in members)) as bar:
        for member in members:
            bundle.extract(member, destination)
            bar.update(member.file_size)


def unpack(archive_path: Path, archive: Archive, root: Path) -> None:
    """Extract into a scratch directory, then rename into place.

    An interrupted unpack therefore never leaves a directory that looks complete; its leftovers
    are discarded by the next run.
    """
    scratch = root / f".{archive.unpacks_to}.unpacking"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive_path) as bundle:
            check_layout(bundle.infolist(), archive, archive_path)
            extract_members(bundle, scratch, archive.filename)
        (scratch / archive.unpacks_to).replace(root / archive.unpacks_to)
    except zipfile.BadZipFile as error:
        raise CocoDownloadError(
            f"{archive_path} cannot be unpacked ({error}). Delete it and re-run `make coco`."
        ) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def prepare_coco(
    root: Path,
    archives: Sequence[Archive],
    base_url: str = OFFICIAL_BASE_URL,
    keep_archives: bool = False,
) -> None:
    """Make every archive's directory present under root, doing only the work still missing."""
    root.mkdir(parents=True, exist_ok=True)
    pending = [archive for archive in archives if not is_unpacked(archive, root)]
    for archive in archives:
        if archive not in pending:
            print(f"{root / archive.unpacks_to} is already in place.")
    if not pending:
        return
    check_free_space(pending, root)
    downloads = root / "downloads"
    downloads.mkdir(exist_ok=True)
    for archive in pending:
        archive_path = obtain_archive(archive, base_url, downloads)
        unpack(archive_path, archive, root)
        if not keep_archives:
            archive_path.unlink()
        print(f"{root / archive.unpacks_to} is ready.")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Download, verify and unpack COCO 2017 images and caption annotations."
    )
    parser.add_argument("--root", type=Path, default=Path("data/coco"), help="target directory")
    parser.add_argument(
        "--splits",
        nargs="+",
        choices=["train", "val"],
        default=["train", "val"],
        help="image splits to fetch (annotations always come along)",
    )
    parser.add_argument(
        "--only-annotations", action="store_true", help="fetch the annotations archive only"
    )
    parser.add_argument(
        "--keep-archives",
        action="store_true",
        help="keep the zip files after unpacking (about 20 GB more disk)",
    )
    parser.add_argument(
        "--base-url",
        default=OFFICIAL_BASE_URL,
        help=f"server with the official file paths (default: {OFFICIAL_BASE_URL})",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, table: Mapping[str, Archive] = COCO_ARCHIVES) -> int:
    """Command-line entry point: 0 on success, 1 with a message on stderr on expected failures."""
    args = parse_args(argv)
    archives = select_archives(table, args.splits, args.only_annotations)
    try:
        prepare_coco(args.root, archives, args.base_url, args.keep_archives)
    except CocoDownloadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # disk full, permissions: the OS message names the path
        print(
            f"error: {error}. Fix this and re-run `make coco`; finished work is kept.",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("Interrupted. Re-run `make coco` to continue where it stopped.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
