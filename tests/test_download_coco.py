"""`make coco` (ldm/data/coco_download.py) against tiny archives served from 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import random
import socket
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import ldm.data.coco_download as download_coco


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as bundle:
        for name, content in files.items():
            bundle.writestr(name, content)
    return buffer.getvalue()


def noise(seed: int, size: int) -> bytes:
    """Incompressible bytes, so zips are big enough to split for resume tests."""
    return random.Random(seed).randbytes(size)


CONTENTS = {
    "annotations": {
        "annotations/captions_train2017.json": b'{"images": [], "annotations": []}',
        "annotations/captions_val2017.json": b'{"images": [], "annotations": []}',
    },
    "val": {f"val2017/{i:012d}.jpg": noise(i, 20_000) for i in range(2)},
    "train": {f"train2017/{i:012d}.jpg": noise(100 + i, 30_000) for i in range(3)},
}
URL_PATHS = {
    "annotations": "annotations/annotations_trainval2017.zip",
    "val": "zips/val2017.zip",
    "train": "zips/train2017.zip",
}
PAYLOADS = {name: zip_bytes(files) for name, files in CONTENTS.items()}
TABLE = {
    name: download_coco.Archive(
        url_path=URL_PATHS[name],
        size=len(PAYLOADS[name]),
        md5=hashlib.md5(PAYLOADS[name]).hexdigest(),
        unpacks_to=next(iter(CONTENTS[name])).split("/")[0],
        file_count=len(CONTENTS[name]),
        unpacked_bytes=sum(len(content) for content in CONTENTS[name].values()),
    )
    for name in CONTENTS
}
SERVED = {URL_PATHS[name]: PAYLOADS[name] for name in CONTENTS}


@dataclass
class ServerLog:
    """Where a local test server listens, what it was asked for and how many bytes it sent."""

    base_url: str
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    bytes_sent: int = 0


def make_handler(
    files: dict[str, bytes], honour_range: bool, cut_after: int | None, log: ServerLog
) -> type:
    """Serve files, optionally ignoring Range or hanging up after ``cut_after`` body bytes."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.lstrip("/")
            range_header = self.headers.get("Range")
            log.requests.append((path, range_header))
            if path not in files:
                self.send_error(404)
                return
            body = files[path]
            # The downloader only ever asks for "bytes=N-".
            start = int(range_header[6:-1]) if honour_range and range_header else 0
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            sent = body[start:cut_after]
            self.wfile.write(sent)
            log.bytes_sent += len(sent)

        def log_message(self, *args: object) -> None:
            """Keep test output clean."""

    return Handler


@dataclass
class DiskUsage:
    """Stands in for shutil.disk_usage's result; only ``free`` is read."""

    free: int


@pytest.fixture
def start_server() -> Iterator[Callable[..., ServerLog]]:
    servers: list[ThreadingHTTPServer] = []

    def start(
        files: dict[str, bytes] = SERVED, honour_range: bool = True, cut_after: int | None = None
    ) -> ServerLog:
        log = ServerLog(base_url="")
        handler = make_handler(files, honour_range, cut_after, log)
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(httpd)
        log.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
        return log

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def server(start_server: Callable[..., ServerLog]) -> ServerLog:
    return start_server()


@pytest.fixture
def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def run(root: Path, base_url: str, *extra: str) -> int:
    return download_coco.main(["--root", str(root), "--base-url", base_url, *extra], table=TABLE)


def assert_unpacked(root: Path, *names: str) -> None:
    for name in names:
        for member, content in CONTENTS[name].items():
            assert (root / member).read_bytes() == content


def test_downloads_verifies_and_unpacks_into_the_coco_layout(tmp_path: Path, server: ServerLog):
    root = tmp_path / "coco"

    assert run(root, server.base_url) == 0

    assert_unpacked(root, "annotations", "val", "train")
    assert (root / "annotations" / "captions_train2017.json").is_file()
    assert sorted(p.name for p in root.iterdir()) == [
        "annotations",
        "downloads",
        "train2017",
        "val2017",
    ]
    assert list((root / "downloads").iterdir()) == []  # archives removed once unpacked


def test_keep_archives_leaves_the_verified_zips_in_downloads(tmp_path: Path, server: ServerLog):
    root = tmp_path / "coco"

    assert run(root, server.base_url, "--keep-archives") == 0

    assert (root / "downloads" / "train2017.zip").read_bytes() == PAYLOADS["train"]


def test_only_annotations_fetches_just_the_annotations_archive(tmp_path: Path, server: ServerLog):
    root = tmp_path / "coco"

    assert run(root, server.base_url, "--only-annotations") == 0

    assert [path for path, _ in server.requests] == [URL_PATHS["annotations"]]
    assert_unpacked(root, "annotations")
    assert not (root / "train2017").exists()


def test_resume_requests_only_the_missing_bytes(tmp_path: Path, server: ServerLog):
    root = tmp_path / "coco"
    (root / "downloads").mkdir(parents=True)
    already = 40_000
    partial = root / "downloads" / "train2017.zip.part"
    partial.write_bytes(PAYLOADS["train"][:already])

    assert run(root, server.base_url, "--splits", "train") == 0

    assert (URL_PATHS["train"], f"bytes={already}-") in server.requests
    expected_sent = len(PAYLOADS["annotations"]) + len(PAYLOADS["train"]) - already
    assert server.bytes_sent == expected_sent
    assert_unpacked(root, "train")
    assert not partial.exists()


def test_dropped_connection_is_reported_and_the_next_run_resumes(
    tmp_path: Path, start_server: Callable[..., ServerLog], capsys: pytest.CaptureFixture[str]
):
    flaky = start_server(cut_after=50_000)
    root = tmp_path / "coco"

    assert run(root, flaky.base_url, "--splits", "train") == 1

    message = capsys.readouterr().err
    assert f"closed after 50000 of {TABLE['train'].size} bytes" in message
    assert "Re-run `make coco` to resume" in message
    healthy = start_server()
    assert run(root, healthy.base_url, "--splits", "train") == 0
    assert healthy.requests == [(URL_PATHS["train"], "bytes=50000-")]
    assert_unpacked(root, "train")


def test_server_ignoring_range_restarts_the_download_cleanly(
    tmp_path: Path, start_server: Callable[..., ServerLog], capsys: pytest.CaptureFixture[str]
):
    server = start_server(honour_range=False)
    root = tmp_path / "coco"
    (root / "downloads").mkdir(parents=True)
    (root / "downloads" / "train2017.zip.part").write_bytes(PAYLOADS["train"][:40_000])

    assert run(root, server.base_url, "--splits", "train") == 0

    assert "cannot resume" in capsys.readouterr().out
    assert_unpacked(root, "train")


def test_checksum_mismatch_is_reported_and_the_bad_download_deleted(
    tmp_path: Path, start_server: Callable[..., ServerLog], capsys: pytest.CaptureFixture[str]
):
    corrupted = bytearray(PAYLOADS["train"])
    corrupted[1000] ^= 0xFF
    server = start_server({**SERVED, URL_PATHS["train"]: bytes(corrupted)})
    root = tmp_path / "coco"

    assert run(root, server.base_url, "--splits", "train") == 1

    message = capsys.readouterr().err
    assert "train2017.zip is corrupt" in message
    assert hashlib.md5(corrupted).hexdigest() in message
    assert TABLE["train"].md5 in message
    assert not (root / "downloads" / "train2017.zip.part").exists()
    assert not (root / "train2017").exists()


def test_server_announcing_another_size_is_refused_before_downloading(
    tmp_path: Path, start_server: Callable[..., ServerLog], capsys: pytest.CaptureFixture[str]
):
    server = start_server({**SERVED, URL_PATHS["train"]: PAYLOADS["train"] + b"extra"})
    root = tmp_path / "coco"

    assert run(root, server.base_url, "--splits", "train") == 1

    assert f"is {TABLE['train'].size + 5} bytes" in capsys.readouterr().err
    assert not (root / "downloads" / "train2017.zip.part").exists()


def test_second_run_downloads_nothing_and_succeeds(
    tmp_path: Path, server: ServerLog, capsys: pytest.CaptureFixture[str]
):
    root = tmp_path / "coco"
    assert run(root, server.base_url) == 0
    requests_after_first_run = len(server.requests)
    capsys.readouterr()

    assert run(root, server.base_url) == 0

    assert len(server.requests) == requests_after_first_run
    assert capsys.readouterr().out.count("already in place") == 3


def test_unreachable_server_gives_an_actionable_message_and_nonzero_exit(
    tmp_path: Path, closed_port_url: str, capsys: pytest.CaptureFixture[str]
):
    root = tmp_path / "coco"

    assert run(root, closed_port_url) == 1

    message = capsys.readouterr().err
    assert message.startswith("error: Could not reach 127.0.0.1:")
    assert "Check your network/proxy" in message
    assert f"manually into {root / 'downloads'}/ and re-run `make coco`" in message
    assert "Traceback" not in message


def test_archive_placed_by_hand_is_used_without_the_network(tmp_path: Path, closed_port_url: str):
    root = tmp_path / "coco"
    (root / "downloads").mkdir(parents=True)
    for name in ("annotations", "val"):
        (root / "downloads" / TABLE[name].filename).write_bytes(PAYLOADS[name])

    assert run(root, closed_port_url, "--splits", "val") == 0

    assert_unpacked(root, "annotations", "val")


def test_wrong_archive_placed_by_hand_is_kept_and_reported(
    tmp_path: Path, closed_port_url: str, capsys: pytest.CaptureFixture[str]
):
    root = tmp_path / "coco"
    (root / "downloads").mkdir(parents=True)
    placed = root / "downloads" / "annotations_trainval2017.zip"
    placed.write_bytes(b"not the archive")

    assert run(root, closed_port_url, "--only-annotations") == 1

    message = capsys.readouterr().err
    assert "is not the official annotations_trainval2017.zip" in message
    assert f"it is 15 bytes, the official archive is {TABLE['annotations'].size}" in message
    assert placed.exists()


def test_missing_disk_space_is_reported_before_any_download(
    tmp_path: Path,
    server: ServerLog,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    monkeypatch.setattr(download_coco.shutil, "disk_usage", lambda _: DiskUsage(free=1_000))
    root = tmp_path / "coco"

    assert run(root, server.base_url) == 1

    message = capsys.readouterr().err
    assert f"Not enough free disk space in {root.resolve()}" in message
    assert "GB needed" in message
    assert server.requests == []


def test_failed_unpack_leaves_no_complete_looking_directory_and_keeps_the_archive(
    tmp_path: Path,
    server: ServerLog,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    real_extract = zipfile.ZipFile.extract
    train_members_written: list[zipfile.ZipInfo] = []

    def fill_the_disk_after_one_train_image(self, member, path=None, pwd=None):
        if member.filename.startswith("train2017/"):
            if train_members_written:
                raise OSError(28, "No space left on device")
            train_members_written.append(member)
        return real_extract(self, member, path, pwd)

    monkeypatch.setattr(zipfile.ZipFile, "extract", fill_the_disk_after_one_train_image)
    root = tmp_path / "coco"

    assert run(root, server.base_url, "--splits", "train") == 1

    assert "No space left on device" in capsys.readouterr().err
    assert not (root / "train2017").exists()
    assert (root / "downloads" / "train2017.zip").exists()
    monkeypatch.undo()
    requests_before_rerun = len(server.requests)
    assert run(root, server.base_url, "--splits", "train") == 0
    assert len(server.requests) == requests_before_rerun
    assert_unpacked(root, "train")


def test_leftovers_of_an_interrupted_unpack_are_discarded(tmp_path: Path, server: ServerLog):
    root = tmp_path / "coco"
    leftover = root / ".train2017.unpacking" / "train2017" / "half-written.jpg"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"partial")

    assert run(root, server.base_url, "--splits", "train") == 0

    assert_unpacked(root, "train")
    assert not (root / "train2017" / "half-written.jpg").exists()
    assert not (root / ".train2017.unpacking").exists()


def test_damaged_unpacked_directory_is_reported_not_trusted(
    tmp_path: Path, server: ServerLog, capsys: pytest.CaptureFixture[str]
):
    root = tmp_path / "coco"
    assert run(root, server.base_url) == 0
    next((root / "train2017").iterdir()).unlink()

    assert run(root, server.base_url) == 1

    message = capsys.readouterr().err
    assert f"{root / 'train2017'} holds 2 files but train2017.zip unpacks 3" in message
    assert "Delete" in message
