"""The service on a data directory whose file system fills up or is read-only, for real: a
small tmpfs (root only) as `--data`, real videos from a loopback origin. An ingest the disk
cannot take answers 507 with one line naming the cause and the directory, logged the same;
nothing of it is left (temp file, frames, blob, record); the videos stored before are still
listed and served whole, and once space is freed the next ingest works, without a restart.
A download whose size is known ahead and does not fit (with what the downloads under way will
still write) is refused before it starts; one whose size is not known stops before it takes
the room left for the index and frames or promised to others. A server started on a full or
read-only data directory says why in one line, exit status 1; one whose older index finds no
room to be rewritten whole starts, with one warning, and rewrites it at a later start; so
does one whose rewrite's fsync, or one of its reads, fails once, and one whose reads keep
failing stops (an LD_PRELOAD library failing those calls: tests/disk_faults.c).
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service_stress_support import HoldingOrigin, PausingServer, TrickleOrigin, listing
from tests.service_support import (
    SESSION_TOKEN,
    SIGNATURE,
    Api,
    blob_files,
    digest,
    files_holding_secrets,
    presigned,
    redirector,
    serve_origin,
    serve_refused,
    shown,
    temp_files,
)
from tests.support import VidcacheServer, free_port, preload_library, serve_directory, wait_until
from vidcache.chunks import DEFAULT_CHUNK_SIZE
from vidcache.space import MARGIN, needed
from vidcache_client import ServerError, VidCacheClient

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")]

MIB = 1024 * 1024
PAGE = 4096
MALFORMED = "database disk image is malformed"


@contextlib.contextmanager
def small_tmpfs(target: Path, size: str = "8m") -> Iterator[Path]:
    """A tmpfs of `size` mounted at the new directory `target`, for a data directory (the
    server's log goes next to it, off the full disk); unmounted at the end."""
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "none", str(target)],
                   check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=False)


@contextlib.contextmanager
def on_loop_device(target: Path, size: int, mkfs: list[str], fstype: str,
                   *mount_options: str) -> Iterator[str]:
    """A file system made by `mkfs` in a file of `size` bytes, on a loop device, mounted as
    `fstype` with `mount_options` at the new directory `target`; yields the loop device. Skips
    the test where the file system or loop devices are not available. Unmounted and its loop
    device detached at the end."""
    if not (shutil.which(mkfs[0]) and shutil.which("losetup")):
        pytest.skip(f"needs {mkfs[0]} and losetup")
    image = target.parent / f"{target.name}.img"
    with open(image, "wb") as file:
        file.truncate(size)
    subprocess.run([*mkfs, str(image)], check=True, capture_output=True)
    attach = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True,
                            text=True)
    if attach.returncode != 0:
        pytest.skip(f"no loop device: {attach.stderr.strip()}")
    device = attach.stdout.strip()
    try:
        target.mkdir()
        mount = subprocess.run(["mount", "-t", fstype, *mount_options, device, str(target)],
                               capture_output=True, text=True)
        if mount.returncode != 0:
            pytest.skip(f"cannot mount {fstype}: {mount.stderr.strip()}")
        try:
            yield device
        finally:
            subprocess.run(["umount", str(target)], check=False)
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)


@contextlib.contextmanager
def ext4_turning_read_only(target: Path) -> Iterator[Path]:
    """An ext4 file system of 64 MiB on a loop device (on_loop_device), mounted at the new
    directory `target` with errors=remount-ro; yields the file that triggers an error, which
    turns it read-only as a failing disk would (it cannot be remounted so while a file is open
    for writing). Skips the test where the trigger is not available either."""
    with on_loop_device(target, 64 * MIB, ["mkfs.ext4", "-q", "-F"], "ext4",
                        "-o", "errors=remount-ro") as device:
        trigger = Path("/sys/fs/ext4", Path(device).name, "trigger_fs_error")
        if not trigger.exists():
            pytest.skip(f"no {trigger} (a kernel without it)")
        yield trigger


@contextlib.contextmanager
def btrfs_with_quota(target: Path) -> Iterator[Path]:
    """A btrfs of 128 MiB on a loop device (on_loop_device), mounted at the new directory
    `target`, its quotas (qgroups) on; yields its new subvolume `quota`, whose quota
    limit_quota sets."""
    with on_loop_device(target, 128 * MIB, ["mkfs.btrfs", "-q", "-f"], "btrfs"):
        for command in (["quota", "enable", str(target)],
                        ["subvolume", "create", str(target / "quota")]):
            subprocess.run(["btrfs", *command], check=True, capture_output=True)
        yield target / "quota"


def limit_quota(subvolume: Path, room: int | None) -> None:
    """The quota of the btrfs subvolume: what it holds now and `room` bytes more; None: no
    limit."""
    limit = "none"
    if room is not None:
        qgroup = subprocess.run(["btrfs", "qgroup", "show", "--raw", "--sync", "-f",
                                 str(subvolume)], check=True, capture_output=True, text=True)
        referenced = int(qgroup.stdout.splitlines()[-1].split()[1])
        limit = str(referenced + room)
    subprocess.run(["btrfs", "qgroup", "limit", limit, str(subvolume)], check=True)


def fill(directory: Path, leave: int = 0) -> Path:
    """A file taking every free byte of `directory`'s file system but `leave` (a multiple of
    the page size); returns its path."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as sink:
        try:
            while sink.write(bytes(MIB)):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        sink.truncate(sink.tell() - leave)
    status = os.statvfs(directory)
    assert status.f_bavail * status.f_frsize == leave
    return filler


def assert_served_whole(server_url: str, stored: dict[str, Path]) -> None:
    """Every video of `stored` (hash -> source file) listed and served byte-identical."""
    assert sorted(item["hash"] for item in listing(server_url)) == sorted(stored)
    for content_hash, source in stored.items():
        answer = httpx.get(f"{server_url}/video/{content_hash}", timeout=30)
        assert answer.status_code == 200 and answer.content == source.read_bytes()


def assert_disk_full(answer: httpx.Response, server: VidcacheServer, url: str,
                     where: Path) -> str:
    """A 507 whose one-line detail says the disk is full in `where`, logged as the ingest's
    outcome; the detail."""
    assert answer.status_code == 507, answer.text
    detail: str = answer.json()["detail"]
    assert f"in {where}: disk full (no space left on device)" in detail, detail
    assert "\n" not in detail
    wait_until(lambda: f"ingest {url} failed (507): {detail}" in server.log(), timeout=30,
               what="the failure logged")
    assert "Traceback" not in server.log()
    return detail


def wait_logged(server: VidcacheServer, line: str) -> None:
    wait_until(lambda: line in server.log(), timeout=30, what=f"{line!r} logged")


def assert_no_room(answer: httpx.Response, server: VidcacheServer, url: str, where: Path,
                   size: int) -> str:
    """A 507 refusing the download of `url` (`size` bytes) before it starts: its one-line
    detail says what it needs and what is free in `where`, logged as the ingest's outcome; the
    detail."""
    assert answer.status_code == 507, answer.text
    detail: str = answer.json()["detail"]
    need = needed(size, DEFAULT_CHUNK_SIZE)
    assert re.fullmatch(
        rf"cannot write the download of {re.escape(url)} in {re.escape(str(where))}: not "
        rf"enough free space: needs {need} bytes \({need / MIB:.1f} MiB\), \d+ are free "
        r"\([\d.,]+ MiB\)( but \d+ of them are promised to downloads under way)?", detail), detail
    wait_until(lambda: f"ingest {url} failed (507): {detail}" in server.log(), timeout=30,
               what="the failure logged")
    assert "Traceback" not in server.log()
    return detail


def assert_nothing_left(data_dir: Path, blobs: list[Path]) -> None:
    assert temp_files(data_dir) == []
    assert [p for p in blob_files(data_dir) if p.name != "filler"] == blobs


class _Ingest:
    """POST /ingest in a thread; `result()` is the response."""

    def __init__(self, server_url: str, url: str, bucket: str) -> None:
        self.answer: httpx.Response | None = None
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        args=(server_url, url, bucket))
        self._thread.start()

    def _run(self, server_url: str, url: str, bucket: str) -> None:
        self.answer = httpx.post(f"{server_url}/ingest", timeout=120,
                                 json={"url": url, "bucket": bucket})

    def result(self) -> httpx.Response:
        self._thread.join(timeout=120)
        assert self.answer is not None, "no answer to the ingest"
        return self.answer


def wait_half_received(server_url: str, url: str, size: int) -> None:
    """Until the download of `url` (a `/held/` one of `size` bytes) has received its half."""
    wait_until(lambda: any(item["url"] == url and item["bytes_received"] == size // 2
                           for item in httpx.get(f"{server_url}/ingests",
                                                 timeout=10).json()["items"]),
               timeout=60, what=f"half of {url} received")


def test_the_disk_filling_up_during_a_download(tmp_path: Path, videos: dict[str, Path]) -> None:
    """c.mkv (104 KiB, its size announced: its room promised) on an 8 MiB data directory, held
    half-way by its origin while another program fills the disk: once it goes on, its download
    hits ENOSPC. 507 naming the temp directory, logged; nothing left of it; a.mp4, stored
    before, still served whole. The same with 16 KiB left: a write ends short. On the full disk
    an ingest refused at once gives the same 507 through the API, the client (ServerError) and
    `vidcache ingest` (one line, exit 1); once the space is freed c.mkv is stored. (The detail
    was 'cannot write the download of URL: [Errno 28] No space left on device', no directory; a
    write ending short was 500 'internal server error' and a traceback: closing the temp file
    flushed the bytes left buffered, failed again and replaced the 507.)"""
    with (small_tmpfs(tmp_path / "data") as data,
          HoldingOrigin(videos["a.mp4"].parent) as origin,
          VidcacheServer(data) as server):
        api = Api(server.url)
        stored = {api.ingest_ok(f"{origin.url}/a.mp4", "v")["hash"]: videos["a.mp4"]}
        blobs = blob_files(data)
        tmp = data / ".vidcache" / "tmp"
        url, size = f"{origin.url}/held/c.mkv", videos["c.mkv"].stat().st_size
        for leave in (0, 16 * 1024):
            held = _Ingest(server.url, url, "v")
            wait_half_received(server.url, url, size)
            filler = fill(data, leave=leave)
            origin.resume()
            detail = assert_disk_full(held.result(), server, url, tmp)
            assert detail.startswith(f"cannot write the download of {url} in "), detail
            assert_nothing_left(data, blobs)
            assert_served_whole(server.url, stored)
            filler.unlink()

        filler = fill(data)
        url = f"{origin.url}/c.mkv"
        detail = assert_no_room(api.ingest(url, "v"), server, url, tmp, size)
        with VidCacheClient(server.url, timeout=120) as client, \
                pytest.raises(ServerError) as raised:
            client.ingest(url, "v")
        assert raised.value.status_code == 507 and raised.value.detail == detail
        run = subprocess.run([sys.executable, "-m", "vidcache", "ingest", url, "--bucket", "v",
                              "--server", server.url], capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 1 and run.stdout == ""
        assert run.stderr.splitlines() == [
            f"vidcache ingest: error: ingest of {url} into bucket 'v': HTTP 507 Insufficient "
            f"Storage: {detail} [POST {server.url}/ingest]"], run.stderr
        assert_nothing_left(data, blobs)
        filler.unlink()
        stored[api.ingest_ok(url, "v")["hash"]] = videos["c.mkv"]
        assert_served_whole(server.url, stored)


def _growing_shortage(url: str, where: Path) -> str:
    """The pattern of the detail of a 507 stopping the download of `url`, of unknown size, in
    `where`; its groups: bytes needed, written, free, promised to others (or None)."""
    return (rf"cannot write the download of {re.escape(url)} in {re.escape(str(where))}: not "
            r"enough free space: needs (\d+) bytes \([\d.,]+ MiB\) more after (\d+) written "
            r"\([\d.,]+ MiB\), (\d+) are free \([\d.,]+ MiB\)"
            r"(?: but (\d+) of them are promised to downloads under way)?")


@pytest.mark.parametrize("how", ["chunked", "gzip"])
def test_a_download_of_unknown_size_stops_before_the_disk_is_full(
        tmp_path: Path, videos: dict[str, Path], how: str) -> None:
    """A download whose size is not known ahead onto a data directory with room for 8 MiB
    besides big.mp4 (22 MB), whose download is held half-way with the rest of its room
    promised: big_moov_end.mp4 (22 MB) sent chunked (no Content-Length), or 24 MiB sent
    gzip-compressed (a Content-Length of 3 MiB: 8 KiB of random bytes in every 64 KiB, zeros
    between; the service stores the decoded bytes). It is stopped with 507 'not enough free
    space' once the next piece and the room for the index and frames no longer fit beside
    big.mp4's promise, saying what it has written and needs and what is free: the disk keeps
    that room (1 MiB, less a page of rounding) and the promise; logged; nothing left of it.
    big.mp4 then goes on and is stored. (Before: it wrote until the disk was full, 507 'disk
    full'.)"""
    payload = tmp_path / "payload"
    payload.mkdir()
    (payload / "sparse.bin").write_bytes(b"".join(
        os.urandom(8 * 1024) + bytes(56 * 1024) for _ in range(24 * 16)))
    big, size = videos["big.mp4"], videos["big.mp4"].stat().st_size
    with (small_tmpfs(tmp_path / "data", size="48m") as data,
          HoldingOrigin(big.parent) as origin,
          serve_origin(payload) as (gzipping, _stalled),
          VidcacheServer(data) as server):
        api = Api(server.url)
        url = (f"{origin.url}/chunked/big_moov_end.mp4" if how == "chunked" else
               f"{gzipping}/gzip/sparse.bin")
        fill(data, leave=-(-needed(size, DEFAULT_CHUNK_SIZE) // PAGE) * PAGE + 8 * MIB)
        held_url = f"{origin.url}/held/big.mp4"
        held = _Ingest(server.url, held_url, "v")
        wait_half_received(server.url, held_url, size)

        answer = api.ingest(url, "v")
        assert answer.status_code == 507, answer.text
        detail = answer.json()["detail"]
        match = re.fullmatch(_growing_shortage(url, data / ".vidcache" / "tmp"), detail)
        assert match, detail
        need, written, free, promised = (int(group) for group in match.groups())
        assert need > free - promised >= MARGIN - PAGE, detail
        assert written > 6 * MIB, detail  # it had the room it may use
        wait_logged(server, f"ingest {url} failed (507): {detail}")
        assert "Traceback" not in server.log()
        assert len(temp_files(data)) == 1  # big.mp4's

        origin.resume()
        assert held.result().status_code == 200, held.result().text
        stored = held.result().json()
        assert stored["status"] == "new"
        assert_nothing_left(data, [data / stored["file_path"]])
        assert_served_whole(server.url, {stored["hash"]: big})


def test_a_download_of_unknown_size_needs_room_for_what_it_writes(
        tmp_path: Path, videos: dict[str, Path]) -> None:
    """c.mkv sent chunked (its size not announced) in 4 KiB chunks with a page less free than
    its bytes and the room for the index and frames: 507 'not enough free space', logged,
    nothing left. With a page more than that (for the part of a page the bytes written so far
    leave unused): stored. (Before: stored with the room it had, taking the margin; then, until
    each piece was flushed as written, stored with that page less: the chunk left in the
    file's buffer, of a page here (st_blksize), counted as written while the free space did
    not have it taken yet.) With less room than its first piece needs, the refusal says 0
    were written: it said only 'needs N bytes', N the first piece's room, which read as the
    video's size."""
    size = videos["c.mkv"].stat().st_size
    room = -(-needed(size, DEFAULT_CHUNK_SIZE) // PAGE) * PAGE
    with (small_tmpfs(tmp_path / "data") as data,
          HoldingOrigin(videos["c.mkv"].parent, chunk=PAGE) as origin,
          VidcacheServer(data) as server):
        api = Api(server.url)
        url = f"{origin.url}/chunked/c.mkv"
        filler = fill(data, leave=room - PAGE)
        answer = api.ingest(url, "v")
        assert answer.status_code == 507, answer.text
        detail = answer.json()["detail"]
        assert re.fullmatch(_growing_shortage(url, data / ".vidcache" / "tmp"), detail), detail
        wait_logged(server, f"ingest {url} failed (507): {detail}")
        assert_nothing_left(data, [])
        filler.unlink()

        filler = fill(data, leave=MARGIN // 2)
        answer = api.ingest(url, "v")
        assert answer.status_code == 507, answer.text
        shortage = re.fullmatch(_growing_shortage(url, data / ".vidcache" / "tmp"),
                                answer.json()["detail"])
        assert shortage is not None and shortage[2] == "0", answer.json()["detail"]
        filler.unlink()

        filler = fill(data, leave=room + PAGE)
        stored = api.ingest_ok(url, "v")
        assert_served_whole(server.url, {stored["hash"]: videos["c.mkv"]})
        filler.unlink()


@pytest.mark.parametrize("source", ["http", "file"])
def test_a_download_announced_larger_than_the_free_space(tmp_path: Path,
                                                         videos: dict[str, Path],
                                                         source: str) -> None:
    """big.mp4 (22 MB) on an 8 MiB data directory, its size announced (Content-Length, a
    file's size): 507 before its download, saying what it needs and what is free; the origin
    sent next to nothing of it (a piece of 64 KiB every 0.1 s until the server hangs up);
    nothing left of it. With --max-size below it, 413 all the same. c.mkv with a page less
    than its bytes and the margin for the index and frames: refused; with exactly that room:
    stored (the check never refuses what fits). (Before: the download went on until the disk
    was full, 8 MiB fetched and written for nothing, then 'disk full'.)"""
    directory = videos["a.mp4"].parent
    with (small_tmpfs(tmp_path / "data") as data,
          TrickleOrigin(directory, piece=64 * 1024, pause=0.1) as origin):
        def url_of(name: str) -> str:
            return f"{origin.url}/slow/{name}" if source == "http" else videos[name].as_uri()

        big = url_of("big.mp4")
        with VidcacheServer(data, "--allow-file-dir", str(directory)) as server:
            api = Api(server.url)
            stored = {api.ingest_ok(f"{origin.url}/a.mp4", "v")["hash"]: videos["a.mp4"]}
            blobs = blob_files(data)
            tmp = data / ".vidcache" / "tmp"
            assert_no_room(api.ingest(big, "v"), server, big, tmp, videos["big.mp4"].stat().st_size)
            assert origin.sent("/slow/big.mp4") <= 2 * MIB  # the server hung up at once
            assert_nothing_left(data, blobs)
            assert_served_whole(server.url, stored)

            small, size = url_of("c.mkv"), videos["c.mkv"].stat().st_size
            room = -(-needed(size, DEFAULT_CHUNK_SIZE) // PAGE) * PAGE
            filler = fill(data, leave=room - PAGE)
            assert_no_room(api.ingest(small, "v"), server, small, tmp, size)
            assert_nothing_left(data, blobs)
            filler.unlink()
            filler = fill(data, leave=room)
            stored[api.ingest_ok(small, "v")["hash"]] = videos["c.mkv"]
            assert_served_whole(server.url, stored)
            filler.unlink()

        with VidcacheServer(data, "--allow-file-dir", str(directory),
                            "--max-size", "10M") as server:
            answer = Api(server.url).ingest(big, "v")
            assert answer.status_code == 413 and "--max-size" in answer.json()["detail"], \
                answer.text


def test_space_promised_to_the_downloads_under_way(tmp_path: Path,
                                                   videos: dict[str, Path]) -> None:
    """Room for big.mp4 (22 MB) and c.mkv but not for two 22 MB videos. big.mp4, held
    half-way by its origin, has the rest of it promised: big_moov_end.mp4 (22 MB) is refused
    at once, saying so, next to nothing sent by its origin; c.mkv, which fits beside it, is
    stored. Once big.mp4's download has failed (its origin gone) its room is free again:
    big_moov_end.mp4 is stored (sent at full speed). (Before: big_moov_end.mp4 started, the
    two filled the disk, and one failed after 13 MB more written for nothing.)"""
    directory = videos["a.mp4"].parent
    sizes = {name: videos[name].stat().st_size for name in ("big.mp4", "c.mkv",
                                                            "big_moov_end.mp4")}
    rooms = {name: -(-needed(size, DEFAULT_CHUNK_SIZE) // PAGE) * PAGE
             for name, size in sizes.items()}
    with (small_tmpfs(tmp_path / "data", size="64m") as data,
          TrickleOrigin(directory, piece=64 * 1024, pause=0.1) as trickle,
          VidcacheServer(data) as server):
        api = Api(server.url)
        fill(data, leave=rooms["big.mp4"] + rooms["c.mkv"] + MIB)
        other = f"{trickle.url}/slow/big_moov_end.mp4"
        with serve_origin(directory) as (stalling, _stalled):
            held = _Ingest(server.url, f"{stalling}/stall/big.mp4", "v")
            wait_until(lambda: any(item["bytes_received"] for item in httpx.get(
                f"{server.url}/ingests", timeout=10).json()["items"]), timeout=60,
                what="big.mp4's download under way")
            detail = assert_no_room(api.ingest(other, "v"), server, other,
                                    data / ".vidcache" / "tmp", sizes["big_moov_end.mp4"])
            assert "promised to downloads under way" in detail, detail
            assert trickle.sent("/slow/big_moov_end.mp4") <= 2 * MIB
            small = api.ingest_ok(f"{trickle.url}/slow/c.mkv", "v")
        assert held.result().status_code == 502, held.result().text
        assert_nothing_left(data, [data / small["file_path"]])
        assert api.ingest_ok(f"{trickle.url}/big_moov_end.mp4", "v")["status"] == "new"
        assert_served_whole(server.url, {small["hash"]: videos["c.mkv"],
                                         digest(videos["big_moov_end.mp4"].read_bytes()):
                                             videos["big_moov_end.mp4"]})


def test_the_room_of_a_download_is_held_until_its_ingest_ends(
        tmp_path: Path, videos: dict[str, Path]) -> None:
    """c.mkv downloaded, validated and held as its frames' directory is made (the frames and
    the index's update still to come) on a data directory with room for c.mkv and b.mp4 but
    half the margin: b.mp4 is refused, saying what c.mkv keeps (the margin and its digests'
    room) is promised to downloads under way, whether its size is announced (at once) or not
    (sent chunked: at its first piece). c.mkv then goes on and is stored, and b.mp4 after it.
    (Before: c.mkv's promise ended with its download, and b.mp4 was let take the room c.mkv's
    frames and index were to use: stored.)"""
    sizes = {name: videos[name].stat().st_size for name in ("c.mkv", "b.mp4")}
    rooms = {name: -(-needed(size, DEFAULT_CHUNK_SIZE) // PAGE) * PAGE
             for name, size in sizes.items()}
    kept = needed(sizes["c.mkv"], DEFAULT_CHUNK_SIZE) - sizes["c.mkv"]
    with (small_tmpfs(tmp_path / "data") as data,
          HoldingOrigin(videos["c.mkv"].parent) as origin):
        server = PausingServer(data, ("os.mkdir", "frames-"))
        with server:
            api = Api(server.url)
            tmp = data / ".vidcache" / "tmp"
            fill(data, leave=rooms["c.mkv"] + rooms["b.mp4"] - MARGIN // 2)
            held = _Ingest(server.url, f"{origin.url}/c.mkv", "v")
            wait_until(server.paused, timeout=60, what="the ingest of c.mkv held at its frames")

            url = f"{origin.url}/b.mp4"
            detail = assert_no_room(api.ingest(url, "v"), server, url, tmp, sizes["b.mp4"])
            assert detail.endswith(f" but {kept} of them are promised to downloads under way"), \
                detail
            chunked = f"{origin.url}/chunked/b.mp4"
            answer = api.ingest(chunked, "v")
            assert answer.status_code == 507, answer.text
            shortage = re.fullmatch(_growing_shortage(chunked, tmp), answer.json()["detail"])
            assert shortage is not None and shortage[4] == str(kept), answer.text

            server.release()
            assert held.result().status_code == 200, held.result().text
            stored = [held.result().json(), api.ingest_ok(url, "v")]
            assert [item["status"] for item in stored] == ["new", "new"]
            assert_nothing_left(data, sorted(data / item["file_path"] for item in stored))
            assert_served_whole(server.url, {stored[0]["hash"]: videos["c.mkv"],
                                             stored[1]["hash"]: videos["b.mp4"]})


def test_failed_ingests_give_back_all_their_room(tmp_path: Path,
                                                 videos: dict[str, Path]) -> None:
    """With exactly the room b.mp4 needs left (its bytes, its digests' and the margin), ingests
    ending at each step after their room was promised: refused at once (big.mp4, 507),
    stopped as it grows (big_moov_end.mp4 without Content-Length, 507), a gzip body cut short
    (502), not a video (422 after its download), a duplicate of a.mp4 stored before (200 after
    its download) and a perceptual one (a_small.mp4: 200 after its frames). Each gives back
    all it was promised: b.mp4 is then stored with exactly that room on the disk (a promise
    left behind would refuse it, 'promised to downloads under way'); nothing left of them."""
    origin_dir = tmp_path / "origin"
    origin_dir.mkdir()
    for name in ("a.mp4", "a_small.mp4", "b.mp4", "big.mp4", "big_moov_end.mp4",
                 "notvideo.bin"):
        (origin_dir / name).symlink_to(videos[name])
    (origin_dir / "a.cut").write_bytes(gzip.compress(videos["a.mp4"].read_bytes())[:-16])
    room = -(-needed(videos["b.mp4"].stat().st_size, DEFAULT_CHUNK_SIZE) // PAGE) * PAGE
    with (small_tmpfs(tmp_path / "data") as data,
          serve_origin(origin_dir) as (origin, _stalled),
          VidcacheServer(data) as server):
        api = Api(server.url)
        first = api.ingest_ok(f"{origin}/a.mp4", "v")
        filler = fill(data, leave=room)
        for path, status in (("big.mp4", 507), ("nolength/big_moov_end.mp4", 507),
                             ("stored-as/gzip/a.cut", 502), ("notvideo.bin", 422),
                             ("a.mp4?again", 200), ("a_small.mp4", 200)):
            answer = api.ingest(f"{origin}/{path}", "v")
            assert answer.status_code == status, (path, answer.text)
            assert status != 200 or answer.json()["status"] == "duplicate", answer.text
        assert_nothing_left(data, [data / first["file_path"]])
        filler.unlink()  # the index has grown by the aliases: the same room again
        fill(data, leave=room)
        assert api.ingest_ok(f"{origin}/b.mp4", "v")["status"] == "new"


@pytest.mark.parametrize(("point", "where"), [
    (("os.rename", "/later/"), "index"),
    (("subprocess.Popen", "'ffmpeg'"), "frames"),
], ids=["index", "frames"])
def test_the_disk_filling_up_after_the_download(tmp_path: Path, videos: dict[str, Path],
                                                point: tuple[str, str], where: str) -> None:
    """The disk fills up while the ingest of c.mkv is held after its download: as its blob
    is moved into the bucket (the index's write-ahead log then cannot grow), or as ffmpeg
    starts sampling frames into the temp directory. 507 naming the directory, nothing of it
    left, the index unchanged; reads work with the disk full; once the filler is gone the URL is
    stored, without a restart. (Was 500 and a traceback for the index, SQLite's
    'database or disk is full'; 422 'not a video: no frame could be decoded' for the frames,
    as ffmpeg exits 0 when it cannot write its outputs.)"""
    with (small_tmpfs(tmp_path / "data") as data,
          serve_directory(videos["a.mp4"].parent) as origin):
        server = PausingServer(data, point)
        with server:
            stored = {}
            if where == "index":  # else the ingest ffmpeg is held for must be c.mkv's
                stored[Api(server.url).ingest_ok(f"{origin}/a.mp4", "v")["hash"]] = \
                    videos["a.mp4"]
            blobs = blob_files(data)
            url = f"{origin}/c.mkv"
            held = _Ingest(server.url, url, "later")
            wait_until(server.paused, timeout=60, what=f"the ingest held at {point}")
            filler = fill(data)
            assert_served_whole(server.url, stored)  # reads work with the disk full
            server.release()
            internal = data / ".vidcache"
            detail = assert_disk_full(held.result(), server, url,
                                      internal / "tmp" if where == "frames" else internal)
            assert detail.startswith("cannot update the index in " if where == "index" else
                                     "cannot write the sampled frames in "), detail
            assert_nothing_left(data, blobs)
            assert_served_whole(server.url, stored)

            filler.unlink()
            new = Api(server.url).ingest_ok(url, "later")
            assert new["status"] == "new"
            assert new["hash"] == digest(videos["c.mkv"].read_bytes())
            assert_served_whole(server.url, {**stored, new["hash"]: videos["c.mkv"]})


def test_the_disk_filling_up_during_the_frame_check(tmp_path: Path,
                                                   videos: dict[str, Path]) -> None:
    """The disk fills up, but for room for the index's update, as ffmpeg starts sampling
    a_small.mp4's frames up close (24 of 240x180: 1 MB) to compare them with a.mp4's, whose
    near-duplicate it is (frame_check.py): 507 naming the temp directory, nothing of it left;
    once the filler is gone it is a.mp4's duplicate, without a restart. (Was: the check, which
    could not be made, stored it apart, a spare copy of a.mp4.)"""
    with (small_tmpfs(tmp_path / "data") as data,
          serve_directory(videos["a.mp4"].parent) as origin):
        server = PausingServer(data, ("subprocess.Popen", "scale=240:180"))
        with server:
            stored = Api(server.url).ingest_ok(f"{origin}/a.mp4", "v")["hash"]
            blobs = blob_files(data)
            url = f"{origin}/a_small.mp4"
            held = _Ingest(server.url, url, "v")
            wait_until(server.paused, timeout=60, what="the ingest held at its frame check")
            filler = fill(data, leave=64 * PAGE)
            server.release()
            detail = assert_disk_full(held.result(), server, url, data / ".vidcache" / "tmp")
            assert detail.startswith("cannot write the sampled frames in "), detail
            assert_nothing_left(data, blobs)
            assert_served_whole(server.url, {stored: videos["a.mp4"]})

            filler.unlink()
            again = Api(server.url).ingest_ok(url, "v")
            assert (again["status"], again["hash"]) == ("duplicate", stored)


def test_a_file_system_turning_read_only(tmp_path: Path, videos: dict[str, Path]) -> None:
    """The data directory's ext4 turns read-only (an error, errors=remount-ro) while big.mp4
    downloads (its origin trickling it) and the ingest of c.mkv is held after its download.
    Both answer 507 naming the read-only file system (their temp files, which cannot be
    removed now, go at the next start), and so do a new ingest and a delete; the video stored
    before is still listed and served whole; no traceback. (Before: the two ingests under
    way were 500 and a traceback, removing their temp file failed again and replaced the 507;
    the delete said 'disk I/O error', SQLite's word for it.)"""
    directory = videos["a.mp4"].parent
    with (ext4_turning_read_only(tmp_path / "data") as trigger,
          TrickleOrigin(directory, piece=64 * 1024, pause=0.1) as origin):
        data = tmp_path / "data"
        with VidcacheServer(data) as server:
            stored = Api(server.url).ingest_ok(f"{origin.url}/a.mp4", "v")["hash"]
        server = PausingServer(data, ("subprocess.Popen", "'ffprobe'"))
        with server:
            api = Api(server.url)
            held_url, downloading_url = f"{origin.url}/c.mkv", f"{origin.url}/slow/big.mp4"
            held = _Ingest(server.url, held_url, "v")
            wait_until(server.paused, timeout=60, what="the ingest of c.mkv held at ffprobe")
            downloading = _Ingest(server.url, downloading_url, "v")
            wait_until(lambda: origin.sent("/slow/big.mp4") > 0, timeout=60,
                       what="big.mp4's download under way")
            trigger.write_text("1")
            server.release()
            internal = data / ".vidcache"
            for answer, url, detail in (
                    (downloading.result(), downloading_url,
                     f"cannot write the download of {downloading_url} in {internal / 'tmp'}"),
                    (held.result(), held_url, f"cannot write the sampled frames in "
                                              f"{internal / 'tmp'}"),
                    (api.ingest(f"{origin.url}/b.mp4", "v"), f"{origin.url}/b.mp4",
                     f"cannot create a temp file in {internal / 'tmp'}")):
                assert answer.status_code == 507, answer.text
                assert answer.json()["detail"] == f"{detail}: read-only file system"
                wait_logged(server, f"ingest {url} failed (507): {detail}: read-only file system")
            deleted = httpx.delete(f"{server.url}/video/{stored}", timeout=30)
            assert deleted.status_code == 507, deleted.text
            assert deleted.json() == {"detail": f"cannot update the index in {internal}: "
                                                "read-only file system"}
            assert_served_whole(server.url, {stored: videos["a.mp4"]})
            assert "Traceback" not in server.log()


def test_start_on_a_full_or_read_only_data_directory(tmp_path: Path, media_url: str) -> None:
    """A data directory with a video, on a full disk, then read-only; a new one on a full
    disk: one line saying why, exit status 1, no traceback. (A full disk was 'cannot open the
    index ...: disk I/O error', as if the disk were failing: SQLite could not grow the index's
    shared-memory file.)"""
    with small_tmpfs(tmp_path / "data") as data:
        with VidcacheServer(data) as server:
            Api(server.url).ingest_ok(f"{media_url}/a.mp4", "v")
        filler = fill(data)
        for directory in (data, data / "new"):
            run = serve_refused(directory)
            assert (run.returncode, run.stdout) == (1, ""), run.stderr
            assert run.stderr.splitlines() == [
                f"vidcache serve: error: cannot open the index in {directory / '.vidcache'}: "
                "disk full (no space left on device)"], run.stderr
        filler.unlink()
        subprocess.run(["mount", "-o", "remount,ro", str(data)], check=True)
        run = serve_refused(data)
        assert (run.returncode, run.stdout) == (1, ""), run.stderr
        assert run.stderr.splitlines() == [
            f"vidcache serve: error: cannot use {data} as the data directory: Read-only file "
            f"system: {data / '.vidcache' / 'lock'}"], run.stderr


class _SqliteTempServer(VidcacheServer):
    """The server with SQLITE_TMPDIR set: where SQLite makes its temporary files, a VACUUM's
    copy of an index larger than its cache among them."""

    def __init__(self, data_dir: Path, temp_dir: Path) -> None:
        super().__init__(data_dir)
        self.temp_dir = temp_dir

    def environment(self) -> dict[str, str]:
        return {**super().environment(), "SQLITE_TMPDIR": str(self.temp_dir)}


NESTED = redirector("http://h.test", presigned("http://cdn.test", "v.mp4", SIGNATURE))
SHORT_TOKEN = redirector("http://h.test", "http://cdn.test/7.mp4?token=7")


def make_older_index(data: Path, media_url: str, copies: int) -> str:
    """A data directory holding a.mp4 (its hash returned), its index of version 2 (every data
    directory's at the upgrade to 3) with `copies` aliases of it besides: 201 with nested
    secrets (NESTED's signature, 200 short tokens, whose digests make the index grow), and a
    deleted alias's token in its free space."""
    with VidcacheServer(data) as server:
        a: str = Api(server.url).ingest_ok(f"{media_url}/a.mp4", "v")["hash"]
    gone = redirector("http://h.test/gone", f"http://c.test/v.mp4?token={SESSION_TOKEN}")
    index = sqlite3.connect(data / ".vidcache" / "index.sqlite3")
    index.execute("PRAGMA secure_delete = OFF")  # the default of SQLite's own builds
    with index:
        index.executemany(
            "INSERT INTO url_aliases (url, hash, added_at) VALUES (?, ?, "
            "'2025-01-31T12:00:00.000Z')",
            [*((f"http://h.test/copies/{n:05}/a.mp4", a) for n in range(copies)),
             *((redirector("http://h.test", f"http://cdn.test/{n}.mp4?token={n}"), a)
               for n in range(200)),
             (NESTED, a), (gone, a)])
        index.execute("DELETE FROM url_aliases WHERE url = ?", (gone,))
        index.execute("PRAGMA user_version = 2")  # as vidcache 2 left it
    index.close()
    assert files_holding_secrets(data) != []
    return a


def vacuum_warning(data: Path, temp_dir: Path, why: str = "disk full") -> str:
    """The pattern of the warning that the index was not rewritten whole because of `why`; its
    groups: bytes needed, free in the data directory, free in the temporary directory."""
    internal = data / ".vidcache"
    return (re.escape(f"the index {internal / 'index.sqlite3'} was not rewritten whole "
                      f"(VACUUM): {why}: it needs about ")
            + r"(\d+) bytes \([\d.,]+ MiB\)" + re.escape(f" free in {internal}, ")
            + r"(\d+) are free \([\d.,]+ MiB\)"
            + re.escape(", and for an index larger than SQLite's cache about ")
            + r"\d+ \([\d.,]+ MiB\)" + re.escape(f" in its temporary directory {temp_dir}, ")
            + r"(\d+) are free \([\d.,]+ MiB\)"
            + re.escape("; until then the text of the aliases rewritten or deleted before "
                        "(their credentials too) may remain in its free pages; the rewrite "
                        "is tried again at the next start"))


def assert_served_and_resolved(server: VidcacheServer, a: str, source: Path) -> None:
    """a.mp4 served whole, and the URLs with nested secrets found."""
    assert_served_whole(server.url, {a: source})
    with contextlib.closing(Api(server.url)) as api:
        for url in (NESTED, SHORT_TOKEN):
            assert api.http.get("/resolve", params={"url": url}).json()["hash"] == a, url
        assert api.meta(a).json()["aliases"][-1] == redirector(
            "http://h.test", shown("http://cdn.test", "v.mp4"))


def assert_rewritten(data: Path, server: VidcacheServer, warning: str) -> None:
    """After the start that rewrote the index whole (VACUUM): version 3, no secret in its
    files, the warning of the start before not repeated, nothing more cut."""
    assert len(re.findall(warning, server.log())) == 1  # the log goes on across starts
    assert server.log().count("removed the credentials from") == 1
    assert files_holding_secrets(data) == []
    with contextlib.closing(sqlite3.connect(data / ".vidcache" / "index.sqlite3")) as index:
        assert index.execute("PRAGMA user_version").fetchone() == (3,)


def test_an_older_index_that_cannot_be_rewritten_on_a_nearly_full_disk(
        tmp_path: Path, media_url: str, videos: dict[str, Path]) -> None:
    """make_older_index's index of over 1 MiB (5000 aliases more), with room for the rewrite
    of the aliases but not for the index's whole (VACUUM): the server starts, the aliases
    rewritten, serves the video and resolves the URLs; one warning says how much room the
    rewrite needs, how much is free, that old text may linger and that it is tried again; the
    failed VACUUM's pages are given back (the write-ahead log emptied; checkpointed only after
    the VACUUM, the grown index could not take the aliases' pages on the disk it had filled).
    Once room is freed, the next start rewrites it: version 3, no secret left in the files,
    the URLs still found. (Before: the server did not start, 'cannot open the index in
    DIR/.vidcache: disk full (no space left on device)', exit 1.)"""
    temp_dir = tmp_path / "sqlite-tmp"
    temp_dir.mkdir()
    with small_tmpfs(tmp_path / "data") as data:
        a = make_older_index(data, media_url, 5000)
        index_file = data / ".vidcache" / "index.sqlite3"
        assert index_file.stat().st_size > MIB
        filler = fill(data, leave=256 * 1024)

        with _SqliteTempServer(data, temp_dir) as server:
            assert_served_and_resolved(server, a, videos["a.mp4"])
            warning = vacuum_warning(data, temp_dir)
            [(need, free, _)] = re.findall(warning, server.log())
            assert MIB < int(need) <= index_file.stat().st_size * 1.01  # the live pages
            assert int(free) < 256 * 1024
            assert "removed the credentials from 201 URL aliases" in server.log()
            assert (data / ".vidcache" / "index.sqlite3-wal").stat().st_size == 0
        with contextlib.closing(sqlite3.connect(index_file)) as index:
            assert index.execute("PRAGMA user_version").fetchone() == (2,)

        # the room it said, besides the first block of the -shm the start makes before it
        filler.unlink()
        fill(data, leave=-(-int(need) // PAGE) * PAGE + 32 * 1024)
        with _SqliteTempServer(data, temp_dir) as server:
            assert_served_and_resolved(server, a, videos["a.mp4"])
        assert_rewritten(data, server, warning)


def test_an_older_index_that_cannot_be_rewritten_for_want_of_temporary_room(
        tmp_path: Path, media_url: str, videos: dict[str, Path]) -> None:
    """make_older_index's index of over 3 MiB (12000 aliases more) on a data directory with
    room, but SQLite's temporary directory (SQLITE_TMPDIR), where a VACUUM copies an index
    larger than its cache (2 MiB), a tmpfs of 1 MiB: the server starts, serves the video and
    resolves the URLs, and the warning names that directory and its room, less than needed
    (the data directory's more). With room there, the next start rewrites the index.
    (Before: the server did not start, 'cannot open the index in DIR/.vidcache: disk full
    (no space left on device)', exit 1, naming a directory with room.)"""
    with (small_tmpfs(tmp_path / "data", "16m") as data,
          small_tmpfs(tmp_path / "sqlite-tmp", "1m") as temp_dir):
        a = make_older_index(data, media_url, 12000)
        assert (data / ".vidcache" / "index.sqlite3").stat().st_size > 3 * MIB

        with _SqliteTempServer(data, temp_dir) as server:
            assert_served_and_resolved(server, a, videos["a.mp4"])
            warning = vacuum_warning(data, temp_dir)
            [(need, free, temp_free)] = re.findall(warning, server.log())
            assert int(temp_free) < int(need) < int(free)

        with _SqliteTempServer(data, tmp_path) as server:
            assert_served_and_resolved(server, a, videos["a.mp4"])
        assert_rewritten(data, server, warning)


def test_an_older_index_that_cannot_be_rewritten_over_a_disk_quota(
        tmp_path: Path, media_url: str, videos: dict[str, Path]) -> None:
    """make_older_index's index of over 3 MiB on a data directory with room, and SQLite's
    temporary directory (SQLITE_TMPDIR), where a VACUUM copies an index larger than its cache,
    on a btrfs subvolume whose quota (a qgroup limit) leaves 1 MiB, its file system with room:
    the VACUUM's write there fails with EDQUOT, which SQLite reports as 'disk I/O error'
    (SQLITE_IOERR_WRITE), not as a full disk. The server starts all the same, serves the video
    and resolves the URLs, and warns as for no room, saying that a write failed and why it may
    have; the version is left at 2. Quota lifted, the next start rewrites the index. (Before:
    the server did not start, 'cannot open the index in DIR/.vidcache: disk I/O error', exit
    1, naming the data directory.) Not the data directory on that subvolume: btrfs copies on
    write, so SQLite's first write to a page of its mapped -shm file needs room under the quota
    too, and without it the server is killed (SIGBUS)."""
    data = tmp_path / "data"
    with btrfs_with_quota(tmp_path / "btrfs") as temp_dir:
        a = make_older_index(data, media_url, 12000)
        assert (data / ".vidcache" / "index.sqlite3").stat().st_size > 3 * MIB
        limit_quota(temp_dir, MIB)

        with _SqliteTempServer(data, temp_dir) as server:
            assert_served_and_resolved(server, a, videos["a.mp4"])
            warning = vacuum_warning(data, temp_dir, "a write failed (disk I/O error: a disk "
                                                     "quota reached, or the disk failing)")
            [(need, free, temp_free)] = re.findall(warning, server.log())
            assert int(need) < min(int(free), int(temp_free))  # room, but not under the quota
        with contextlib.closing(sqlite3.connect(data / ".vidcache" / "index.sqlite3")) as db:
            assert db.execute("PRAGMA user_version").fetchone() == (2,)

        limit_quota(temp_dir, None)
        with _SqliteTempServer(data, temp_dir) as server:
            assert_served_and_resolved(server, a, videos["a.mp4"])
        assert_rewritten(data, server, warning)


@pytest.fixture(scope="module")
def disk_faults(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/disk_faults.c built with cc: the LD_PRELOAD library of a disk failing under the
    index. Skips the test without cc."""
    return preload_library("disk_faults", tmp_path_factory.mktemp("disk-faults"))


def disk_fault(library: Path, fault: str, size: int) -> dict[str, str]:
    """The environment variables that make disk_faults.c's `library` inject `fault` past
    `size` bytes (VIDCACHE_FAULT_BYTES)."""
    return {"LD_PRELOAD": str(library), "VIDCACHE_FAULT": fault,
            "VIDCACHE_FAULT_BYTES": str(size)}


class _FaultyDiskServer(_SqliteTempServer):
    """_SqliteTempServer on a disk failing as disk_fault says."""

    def __init__(self, data_dir: Path, temp_dir: Path, fault: dict[str, str]) -> None:
        super().__init__(data_dir, temp_dir)
        self.fault = fault

    def environment(self) -> dict[str, str]:
        return {**super().environment(), **self.fault}


def assert_rewrite_postponed(data: Path, temp_dir: Path, a: str, source: Path,
                             fault: dict[str, str], why: str) -> None:
    """On a disk failing as `fault` says, the server with make_older_index's index starts all
    the same, serves a.mp4 and resolves the URLs, and warns once that the rewrite was put off
    because of `why`; the version is left at 2. The next start, the disk sound, rewrites it."""
    with _FaultyDiskServer(data, temp_dir, fault) as server:
        assert_served_and_resolved(server, a, source)
        warning = vacuum_warning(data, temp_dir, why)
        assert len(re.findall(warning, server.log())) == 1, server.log()
    with contextlib.closing(sqlite3.connect(data / ".vidcache" / "index.sqlite3")) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (2,)

    with _SqliteTempServer(data, temp_dir) as server:
        assert_served_and_resolved(server, a, source)
    assert_rewritten(data, server, warning)


def test_an_older_index_whose_rewrite_fails_to_sync(
        tmp_path: Path, media_url: str, videos: dict[str, Path], disk_faults: Path) -> None:
    """make_older_index's index of over 3 MiB, whose rewrite (VACUUM) is committed with an
    fsync of the write-ahead log that fails with EIO (a write-back error, disk_faults.c): the
    server starts all the same, serves the video and resolves the URLs, and warns that a write
    failed, as for a disk quota; the version is left at 2. The next start, the disk sound,
    rewrites the index."""
    temp_dir = tmp_path / "sqlite-tmp"
    temp_dir.mkdir()
    data = tmp_path / "data"
    a = make_older_index(data, media_url, 12000)
    index = data / ".vidcache" / "index.sqlite3"
    size = index.stat().st_size
    assert size > 3 * MIB
    # a -wal of half the index: the VACUUM's copy, not the aliases' rewrite (a few pages)
    assert_rewrite_postponed(data, temp_dir, a, videos["a.mp4"],
                             disk_fault(disk_faults, "fsync", size // 2),
                             "a write failed (disk I/O error: a disk quota reached, or the disk "
                             "failing)")


def test_an_older_index_whose_rewrite_cannot_read_it(
        tmp_path: Path, media_url: str, videos: dict[str, Path], disk_faults: Path) -> None:
    """make_older_index's index of over 3 MiB, whose pages fail to read (EIO) once its rewrite
    (VACUUM) is copying it, and after (disk_faults.c: sectors gone bad; no earlier read
    fails): SQLite (3.40.1) reports the copy's failed read as SQLITE_CORRUPT, 'database disk
    image is malformed', and the index, read whole again, cannot be: the start stops, in one
    line naming the index and saying its disk fails to read it (not that it is damaged), exit
    status 1, no traceback; the aliases were rewritten before (committed), the version left at
    2. The disk sound again, the next start rewrites the index."""
    temp_dir = tmp_path / "sqlite-tmp"
    temp_dir.mkdir()
    data = tmp_path / "data"
    a = make_older_index(data, media_url, 12000)
    index = data / ".vidcache" / "index.sqlite3"
    assert index.stat().st_size > 3 * MIB
    run = subprocess.run([sys.executable, "-m", "vidcache", "serve", "--data", str(data),
                          "--port", str(free_port())], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "SQLITE_TMPDIR": str(temp_dir),
                                          **disk_fault(disk_faults, "read", 0)})
    assert (run.returncode, run.stdout) == (1, ""), run.stderr
    assert "removed the credentials from 201 URL aliases" in run.stderr
    assert re.fullmatch(
        rf"vidcache serve: error: the index {re.escape(str(index))} cannot be read whole \(its "
        r"disk failing\) \(PRAGMA quick_check: Page \d+: unable to get the page\. error "
        r"code=8458.*\): until it is repaired or restored, .*",
        run.stderr.splitlines()[-1]), run.stderr
    assert "Traceback" not in run.stderr
    with contextlib.closing(sqlite3.connect(index)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (2,)

    with _SqliteTempServer(data, temp_dir) as server:
        assert_served_and_resolved(server, a, videos["a.mp4"])
    assert "removed the credentials from" not in server.log()  # nothing more to cut
    assert "was not rewritten whole" not in server.log()
    assert files_holding_secrets(data) == []
    with contextlib.closing(sqlite3.connect(index)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (3,)


def test_an_older_index_whose_rewrite_fails_to_read_it_once(
        tmp_path: Path, media_url: str, videos: dict[str, Path], disk_faults: Path) -> None:
    """make_older_index's index of over 3 MiB, one of whose reads fails (EIO) while its
    rewrite (VACUUM) is copying it, the disk sound after (disk_faults.c's read-once): SQLite
    says 'database disk image is malformed', but the index reads whole, so the server starts
    all the same, serves the video and resolves the URLs, and warns once that a read failed;
    the version is left at 2 and the next start rewrites the index (as for a failed write).
    Stopping here would tell its operator to restore a sound index."""
    temp_dir = tmp_path / "sqlite-tmp"
    temp_dir.mkdir()
    data = tmp_path / "data"
    a = make_older_index(data, media_url, 12000)
    assert (data / ".vidcache" / "index.sqlite3").stat().st_size > 3 * MIB
    assert_rewrite_postponed(data, temp_dir, a, videos["a.mp4"],
                             disk_fault(disk_faults, "read-once", 0),
                             f"a read failed ({MALFORMED}, but the index reads whole: the disk "
                             "failing)")
