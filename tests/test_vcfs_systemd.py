"""docs/vcfs.md's systemd unit (Mount at boot), as far as it can be tried without systemd as
PID 1 (none here): systemd's own checker takes the unit as written, and the commands it runs,
run as systemd runs them, do what the doc says the unit does: ExecStart mounts and logs to
stderr (the journal), ExecStop unmounts and the daemon exits 0 (the unit stops, not fails),
SIGTERM alone does the same, and after the daemon dies, or when the service is not up yet,
the command fails or its restart clears the stale mount (Restart=on-failure)."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import VidcacheServer, free_port, wait_until
from tests.vcfs_support import ingested_for_mount, requires_fuse
from vcfs.cli import is_stale_mount, mount_entry

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "vcfs.md"
pytestmark = [*requires_fuse,
              pytest.mark.skipif(os.geteuid() != 0, reason="the unit runs as root (allow_other)")]


def unit_text() -> str:
    """The unit file as docs/vcfs.md gives it."""
    found = re.findall(r"^```ini\n(# /etc/systemd/system/vcfs\.service.*?)^```", DOC.read_text(),
                       re.DOTALL | re.MULTILINE)
    assert len(found) == 1, "docs/vcfs.md has one vcfs.service unit"
    return str(found[0])


def service_section() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None, comment_prefixes=("#",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case
    parser.read_string(unit_text())
    return parser["Service"]


@pytest.fixture
def vcfs_program(tmp_path: Path) -> Path:
    """This tree's vcfs as an executable file, where the unit has /usr/local/bin/vcfs."""
    program = tmp_path / "bin" / "vcfs"
    program.parent.mkdir()
    program.write_text(f'#!/bin/sh\nPYTHONPATH={shlex.quote(str(ROOT))} '
                       f'exec {shlex.quote(sys.executable)} -m vcfs "$@"\n')
    program.chmod(0o755)
    return program


def test_systemd_analyze_verify_takes_the_unit_as_written(tmp_path: Path,
                                                           vcfs_program: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("no systemd-analyze (the systemd package; scripts/setup --tests installs it)")
    unit = tmp_path / "vcfs.service"
    unit.write_text(unit_text().replace("/usr/local/bin/vcfs", str(vcfs_program)))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                            timeout=60, check=False)
    # It says what it ignores (a misspelt key, a bad value) on stderr, with exit status 0.
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    bogus = unit.with_name("bogus.service")
    bogus.write_text(unit.read_text().replace("Restart=on-failure", "Restart=sometimes"))
    complaint = subprocess.run([analyze, "verify", str(bogus)], capture_output=True,
                               text=True, timeout=60, check=False).stderr
    assert "Failed to parse service restart specifier" in complaint  # it does check


@pytest.fixture(scope="module")
def video(media_url: str, vidcache_server: VidcacheServer,
          videos: dict[str, Path]) -> tuple[str, bytes]:
    """b.mp4, ingested: its name under by-hash/ and its bytes."""
    return ingested_for_mount(vidcache_server.url, media_url, videos["b.mp4"],
                              bucket="vcfs-systemd")


class Unit:
    """The unit's ExecStart and ExecStop with this test's service, mount point and token file
    in place of the doc's, run as systemd runs them: ExecStart in the foreground, its stderr
    the journal."""

    def __init__(self, url: str, mountpoint: Path, program: Path, journal: Path) -> None:
        section = service_section()
        self.mountpoint = mountpoint
        self.journal = journal
        token = mountpoint.parent / "token"
        token.write_text("a-token\n")  # the test service takes no token, and ignores one
        replacements = {"/usr/local/bin/vcfs": str(program), "http://cache.lan:8020": url,
                        "/mnt/vc": str(mountpoint), "/etc/vcfs/token": str(token)}
        self.start_argv = [replacements.get(word, word)
                           for word in shlex.split(section["ExecStart"])]
        self.stop_argv = [replacements.get(word, word)
                          for word in shlex.split(section["ExecStop"])]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> subprocess.Popen[bytes]:
        with open(self.journal, "ab") as journal:
            self.process = subprocess.Popen(self.start_argv, stdin=subprocess.DEVNULL,
                                            stdout=journal, stderr=journal)
        return self.process

    def wait_mounted(self) -> None:
        process = self.process
        assert process is not None
        wait_until(lambda: process.poll() is not None or _serves(self.mountpoint),
                   timeout=60, what="the unit's mount up")
        assert process.poll() is None, self.journal.read_text()

    def stop(self) -> int:
        """What `systemctl stop` does: ExecStop, then SIGTERM to what is still running."""
        subprocess.run(self.stop_argv, capture_output=True, timeout=60, check=False)
        assert self.process is not None
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            return self.process.wait(timeout=30)


def _serves(mountpoint: Path) -> bool:
    try:
        (mountpoint / ".vcfs" / "stats").read_bytes()
    except OSError:
        return False
    return True


@pytest.fixture
def unit(tmp_path: Path, vidcache_server: VidcacheServer, vcfs_program: Path) -> Iterator[Unit]:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    started = Unit(vidcache_server.url, mountpoint, vcfs_program, tmp_path / "journal")
    try:
        yield started
    finally:
        if started.process is not None and started.process.poll() is None:
            started.process.kill()
            started.process.wait(timeout=30)
        if mount_entry(str(mountpoint)) is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
        print(f"--- the journal ---\n{started.journal.read_text(errors='replace')}"
              if started.journal.exists() else "")


def test_the_units_commands_mount_and_stop_it(unit: Unit, video: tuple[str, bytes]) -> None:
    """systemctl start: the mount serves the videos with the unit's options (allow_other, a
    1G cache), logging to the journal; systemctl stop: ExecStop unmounts and the daemon exits
    0, so the unit is inactive, not failed (and Restart=on-failure leaves it stopped)."""
    name, data = video
    unit.start()
    unit.wait_mounted()
    assert (unit.mountpoint / "by-hash" / name).read_bytes() == data
    options = subprocess.run(["findmnt", "-no", "OPTIONS", "--mountpoint",
                              str(unit.mountpoint)], capture_output=True, text=True,
                             check=True).stdout.strip().split(",")
    assert "allow_other" in options, options
    journal = unit.journal.read_text()
    assert f"at {unit.mountpoint} (cache 1024 MiB in 1 MiB blocks" in journal, journal
    assert f"mounted at {unit.mountpoint}" in journal
    assert unit.stop() == 0, unit.journal.read_text()
    assert mount_entry(str(unit.mountpoint)) is None
    assert f"unmounted {unit.mountpoint}; counters:" in unit.journal.read_text()


def test_sigterm_alone_unmounts_cleanly(unit: Unit, video: tuple[str, bytes]) -> None:
    """The doc: "SIGTERM alone also unmounts cleanly" (systemd's stop without ExecStop)."""
    process = unit.start()
    unit.wait_mounted()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0, unit.journal.read_text()
    assert mount_entry(str(unit.mountpoint)) is None


def test_a_restart_after_the_daemon_died_clears_its_stale_mount(
        unit: Unit, video: tuple[str, bytes]) -> None:
    """Restart=on-failure after the daemon is killed (-9, as the OOM killer does): the same
    command starts on the stale mount left behind, clears it and serves again."""
    name, data = video
    process = unit.start()
    unit.wait_mounted()
    process.kill()
    assert process.wait(timeout=30) == -signal.SIGKILL  # a failure: systemd restarts it
    assert is_stale_mount(str(unit.mountpoint))
    unit.start()
    unit.wait_mounted()
    assert (unit.mountpoint / "by-hash" / name).read_bytes() == data
    assert (f"WARNING vcfs: {unit.mountpoint} is a stale mount (its daemon died); unmounting "
            "it") in unit.journal.read_text()
    assert unit.stop() == 0


def test_the_service_not_up_yet_fails_the_start_so_systemd_restarts_it(
        tmp_path: Path, vcfs_program: Path) -> None:
    """Restart=on-failure also covers a service that is not up yet at boot: the start exits
    non-zero at once, with the reason in the journal, and leaves nothing mounted."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    down = Unit(f"http://127.0.0.1:{free_port()}", mountpoint, vcfs_program,
                tmp_path / "journal")
    process = down.start()
    assert process.wait(timeout=60) == 1
    assert "cannot reach the vidcache service" in down.journal.read_text()
    assert mount_entry(str(mountpoint)) is None
