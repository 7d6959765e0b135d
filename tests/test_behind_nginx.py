"""The service, its client and vcfs behind Debian's nginx as a reverse proxy, as commonly
deployed: at a path prefix (`location /vidcache/ { proxy_pass http://service/; }`), with
nginx's defaults (HTTP/1.0 to the service, proxy buffering), `gzip on` for every type, and a
TLS server block asking for HTTP Basic auth, its certificate from a private CA given by
SSL_CERT_FILE. Skipped when nginx is not installed (scripts/setup --tests installs it)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import VidcacheServer, free_port, self_signed_certificate, wait_until
from tests.vcfs_support import VcfsMount, fuse_missing, requires_fuse, vcfs_command
from vidcache_client import AuthError, VidCacheClient

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
pytestmark = pytest.mark.skipif(not os.path.exists(NGINX),
                                reason="nginx is not installed (scripts/setup --tests)")
VIDEOS = ["a.mp4", "c.mkv", "big.mp4", "big_moov_end.mp4"]
USER, PASSWORD = "viewer", "s3cret"


class Nginx:
    """nginx in front of `upstream` at /vidcache/, its config, logs and pid in `folder`:
    plain HTTP on `port`; TLS asking for Basic auth on `tls_port`; both gzip every type.
    Also /mislabelled/ on `port`: the service with its video answers labelled
    `Content-Encoding: gzip`, as a misconfigured proxy could."""

    def __init__(self, folder: Path, upstream: str, certificate: tuple[Path, Path]) -> None:
        self.folder = folder
        self.upstream = upstream
        self.certificate = certificate
        self.port, self.tls_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}/vidcache"
        self.tls_url = f"https://{USER}:{PASSWORD}@127.0.0.1:{self.tls_port}/vidcache"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Nginx:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "htpasswd").write_text(f"{USER}:{{PLAIN}}{PASSWORD}\n")
        cert, key = self.certificate
        proxy = f"proxy_pass {self.upstream}/;"
        # The workers read the password file and buffer answers under `folder`.
        user = "user root;\n" if os.geteuid() == 0 else ""
        (self.folder / "nginx.conf").write_text(f"""{user}worker_processes 1;
events {{ worker_connections 256; }}
http {{
  log_format conn '$connection $pipe $status "$request"';
  access_log {self.folder}/access.log conn;
  client_body_temp_path {self.folder}/body;
  proxy_temp_path {self.folder}/proxy;
  fastcgi_temp_path {self.folder}/fastcgi;
  uwsgi_temp_path {self.folder}/uwsgi;
  scgi_temp_path {self.folder}/scgi;
  gzip on;
  gzip_types *;
  server {{
    listen 127.0.0.1:{self.port};
    location /vidcache/ {{ {proxy} }}
    location /mislabelled/ {{ {proxy} }}
    location ~ ^/mislabelled(/video/[0-9a-f]+)$ {{
      proxy_pass {self.upstream}$1;
      add_header Content-Encoding gzip;
    }}
  }}
  server {{
    listen 127.0.0.1:{self.tls_port} ssl;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    location /vidcache/ {{
      auth_basic vidcache;
      auth_basic_user_file {self.folder}/htpasswd;
      {proxy}
    }}
  }}
}}
""")
        self.process = subprocess.Popen(
            [NGINX, "-p", str(self.folder), "-e", str(self.folder / "error.log"),
             "-c", str(self.folder / "nginx.conf"),
             "-g", f"daemon off; pid {self.folder}/nginx.pid;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._listening, timeout=20, what="nginx listening")
        return self

    def _listening(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"nginx exited with {self.process.returncode}:\n"
                               f"{(self.folder / 'error.log').read_text(errors='replace')}")
        for port in (self.port, self.tls_port):
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) != 0:
                    return False
        return True

    def stop(self) -> None:
        """SIGTERM (nginx's fast shutdown: connections are closed), SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def requests(self) -> list[tuple[str, str, str, str]]:
        """(connection, pipelined 'p' or '.', status, request line) of each request logged."""
        lines = (self.folder / "access.log").read_text().splitlines()
        return [(connection, pipe, status, request.strip('"'))
                for connection, pipe, status, request in (line.split(" ", 3) for line in lines)]

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed_certificate(tmp_path_factory.mktemp("nginx-tls"))


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VidcacheServer]:
    """A service of this module's own: every video it stores went in through nginx."""
    with VidcacheServer(tmp_path_factory.mktemp("nginx-service") / "data") as server:
        yield server


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory, service: VidcacheServer,
          certificate: tuple[Path, Path]) -> Iterator[Nginx]:
    with Nginx(tmp_path_factory.mktemp("nginx"), service.url, certificate) as proxy:
        yield proxy


@pytest.fixture
def trust(monkeypatch: pytest.MonkeyPatch, certificate: tuple[Path, Path]) -> None:
    """The private CA given as SSL_CERT_FILE, to this process and what it starts."""
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))


@pytest.fixture(scope="module")
def stored(nginx: Nginx, media_url: str, videos: dict[str, Path]) -> dict[str, str]:
    """name -> hash of VIDEOS, ingested through nginx."""
    with VidCacheClient(nginx.url) as client:
        return {name: client.ingest(f"{media_url}/{name}", bucket="nginx")["hash"]
                for name in VIDEOS}


@pytest.mark.usefixtures("trust")
@pytest.mark.parametrize("tls", [False, True], ids=["http-prefix", "https-basic-auth"])
def test_client_reads_and_ingests_through_nginx(
        nginx: Nginx, stored: dict[str, str], videos: dict[str, Path], media_url: str,
        tls: bool) -> None:
    with VidCacheClient(nginx.tls_url if tls else nginx.url) as client:
        assert client.health()["status"] == "ok"
        assert client.ingest(f"{media_url}/a.mp4", bucket="nginx")["status"] == "url_alias"
        assert client.resolve(f"{media_url}/c.mkv") == {"hash": stored["c.mkv"],
                                                        "url": f"{media_url}/c.mkv"}
        listed = {item["hash"] for item in client.list_videos(bucket="nginx", page_size=2)}
        assert listed == set(stored.values())
        for name, content_hash in stored.items():
            data = videos[name].read_bytes()
            meta = client.get_meta(content_hash)
            assert meta is not None and meta["size_bytes"] == len(data)
            assert client.get_bytes(content_hash) == data
            assert client.get_bytes(content_hash, byte_range=(1000, 300_000)) == data[1000:300_001]
            buffer = bytearray(500_000)
            got = client.read_range_into(content_hash, 12_345, [buffer])
            assert bytes(buffer[:got]) == data[12_345:12_345 + got]
            digests = client.get_chunk_digests(content_hash, start=300_000, end=900_000)
            assert digests is not None and digests["first_chunk"] == 300_000 // (256 << 10)
        assert client.get_meta("0" * 64) is None


def test_a_range_is_never_gzipped_by_nginx(nginx: Nginx, stored: dict[str, str],
                                           videos: dict[str, Path]) -> None:
    """nginx compresses only 200s (and 403/404): a 206 comes with its length, uncompressed,
    even to a client that accepts gzip; the digests come gzipped by the service, their
    length kept."""
    video = f"{nginx.url}/video/{stored['big.mp4']}"
    ranged = httpx.get(video, headers={"Range": "bytes=0-99", "Accept-Encoding": "gzip"})
    assert ranged.status_code == 206 and "content-encoding" not in ranged.headers
    assert ranged.headers["content-length"] == "100"
    chunks = httpx.get(f"{video}/chunks", headers={"Accept-Encoding": "gzip"})
    assert chunks.headers["content-encoding"] == "gzip" and "content-length" in chunks.headers
    digests = chunks.json()
    size = videos["big.mp4"].stat().st_size
    assert digests["chunk_count"] == -(-size // digests["chunk_size"])


def test_a_lookup_is_pipelined_through_gzip(nginx: Nginx, stored: dict[str, str]) -> None:
    """nginx gzips the small JSON answers (chunked, no Content-Length): the client reads them
    on its own connections all the same, so a cold lookup's metadata, digests and first
    block still go out at once on one connection."""
    content_hash = stored["big.mp4"]
    with VidCacheClient(nginx.url) as client:
        client.health()  # gzipped by nginx: framed by chunks
        buffer = bytearray(1 << 20)
        metas: list[dict[str, object] | None] = []
        client.open_video_into(content_hash, [buffer], on_meta=metas.append,
                               digests=(0, 1 << 20))
    assert metas[0] is not None and metas[0]["hash"] == content_hash
    # nginx logs a request once its answer is sent: maybe after the client has read it, and
    # the fixture's ingest maybe after this test began (its line came after the count taken
    # at the start): the lookup's requests are those naming the video after the health check
    def lookup_logged() -> list[tuple[str, str, str, str]]:
        logged = nginx.requests()
        checks = [i for i, (*_, request) in enumerate(logged)
                  if request == "GET /vidcache/health HTTP/1.1"]
        return [entry for entry in logged[checks[-1] + 1:] if content_hash in entry[3]] \
            if checks else []

    wait_until(lambda: len(lookup_logged()) >= 3, timeout=10, what="nginx to log the requests")
    lookup = lookup_logged()
    assert [request.split()[1].split("?")[0] for *_, request in lookup] == [
        f"/vidcache/meta/{content_hash}", f"/vidcache/video/{content_hash}/chunks",
        f"/vidcache/video/{content_hash}"]
    assert len({connection for connection, *_ in lookup}) == 1, lookup
    assert [pipe for _, pipe, *_ in lookup] == [".", "p", "p"], lookup


@pytest.mark.usefixtures("trust")
def test_vidcache_ingest_through_nginx(nginx: Nginx, stored: dict[str, str],
                                       media_url: str) -> None:
    run = subprocess.run([sys.executable, "-m", "vidcache", "ingest", "--server", nginx.tls_url,
                          "--bucket", "nginx", f"{media_url}/c.mkv"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["hash"] == stored["c.mkv"]


@pytest.mark.usefixtures("trust")
def test_basic_auth_refusals_say_what_to_give(nginx: Nginx, media_url: str,
                                              tmp_path: Path) -> None:
    """A proxy's 401 asking for Basic auth is not the service asking for a token."""
    without = nginx.tls_url.replace(f"{USER}:{PASSWORD}@", "")
    wrong = nginx.tls_url.replace(PASSWORD, "wrong")
    with VidCacheClient(without) as client, pytest.raises(AuthError) as missing:
        client.health()
    assert "asks for HTTP Basic auth" in str(missing.value), missing.value
    assert "token" not in str(missing.value)
    with VidCacheClient(wrong) as client, pytest.raises(AuthError) as refused:
        client.health()
    assert "refused the user:password" in str(refused.value), refused.value
    run = subprocess.run([sys.executable, "-m", "vidcache", "ingest", "--server", without,
                          "--bucket", "nginx", f"{media_url}/c.mkv"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "Basic auth" in run.stderr and "token" not in run.stderr
    if fuse_missing():
        return
    for url, expected in ((without, "asks for HTTP Basic auth"),
                          (wrong, "refused the user:password")):
        mount = subprocess.run(vcfs_command("mount", url, str(tmp_path), "--foreground"),
                               capture_output=True, text=True, timeout=60)
        assert mount.returncode == 1, mount.stderr
        assert mount.stderr.startswith("vcfs: error: cannot reach") and len(
            mount.stderr.splitlines()) == 1, mount.stderr  # one line, not a traceback
        assert expected in mount.stderr and PASSWORD not in mount.stderr, mount.stderr


@pytest.mark.usefixtures("trust")
@requires_fuse[0]
@requires_fuse[1]
def test_mount_through_nginx(nginx: Nginx, stored: dict[str, str], videos: dict[str, Path],
                             tmp_path: Path) -> None:
    with VcfsMount(nginx.tls_url, tmp_path / "mnt", "--timeout", "20") as mount:
        # a cold lookup by name: metadata, digests and first block in one go
        big = mount.video(f"{stored['big.mp4']}.mp4")
        assert big.stat().st_size == videos["big.mp4"].stat().st_size
        assert big.read_bytes()[:4096] == videos["big.mp4"].read_bytes()[:4096]
        assert mount.stats()["remote"]["first_blocks_used"] == 1
        listing = subprocess.run(["ls", "-l", str(mount.mountpoint / "by-hash")],
                                 capture_output=True, text=True, check=True).stdout
        for name, content_hash in stored.items():
            assert content_hash in listing
            path = mount.video(f"{content_hash}{Path(name).suffix}")
            subprocess.run(["cmp", str(path), str(videos[name])], check=True)
        moov_end = mount.video(f"{stored['big_moov_end.mp4']}.mp4")
        probe = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration",
                                "-of", "csv=p=0", str(moov_end)],
                               capture_output=True, text=True, check=True)
        assert float(probe.stdout) == pytest.approx(8.0, abs=0.1)
        subprocess.run(["ffmpeg", "-v", "error", "-ss", "5", "-i", str(moov_end),
                        "-frames:v", "1", "-f", "null", "-"], check=True)
        original = videos["big_moov_end.mp4"].read_bytes()
        for block in (0, 7, 3001, 5391):
            dd = subprocess.run(["dd", f"if={moov_end}", "bs=4096", f"skip={block}", "count=3",
                                 "status=none"], capture_output=True, check=True)
            assert dd.stdout == original[block * 4096:(block + 3) * 4096]
        remote = mount.stats()["remote"]
        assert remote["verified_chunks"] > 0 and remote["verify_failures"] == 0


@requires_fuse[0]
@requires_fuse[1]
def test_mount_refuses_a_gzip_labelled_range(nginx: Nginx, stored: dict[str, str],
                                             tmp_path: Path) -> None:
    """A proxy that labels the ranges `Content-Encoding: gzip`: their bytes are not the
    video's as served, and a read fails (EIO) instead of returning them."""
    url = nginx.url.replace("/vidcache", "/mislabelled")
    with VcfsMount(url, tmp_path / "mnt", "--timeout", "3", "--no-first-block") as mount:
        path = mount.video(f"{stored['c.mkv']}.mkv")
        with open(path, "rb") as video, pytest.raises(OSError) as failed:
            video.read(4096)
        assert failed.value.errno == errno.EIO
        assert "Content-Encoding 'gzip'" in mount.log()


@pytest.mark.usefixtures("trust")
@requires_fuse[0]
@requires_fuse[1]
def test_nginx_stopping_mid_read(service: VidcacheServer, stored: dict[str, str],
                                 videos: dict[str, Path], certificate: tuple[Path, Path],
                                 tmp_path: Path) -> None:
    """nginx stops while a video is read: the read fails with EIO (within --timeout), and
    reads work again once it is back on its port, without remounting."""
    original = videos["big.mp4"].read_bytes()
    with Nginx(tmp_path / "nginx", service.url, certificate) as proxy, \
            VcfsMount(proxy.tls_url, tmp_path / "mnt", "--timeout", "3",
                      "--readahead-max", "0") as mount:
        fd = os.open(mount.video(f"{stored['big.mp4']}.mp4"), os.O_RDONLY)
        try:
            assert os.pread(fd, 4096, 0) == original[:4096]
            proxy.stop()
            with pytest.raises(OSError) as failed:
                os.pread(fd, 4096, 10 << 20)
            assert failed.value.errno == errno.EIO
            proxy.start()
            assert os.pread(fd, 4096, 10 << 20) == original[10 << 20:(10 << 20) + 4096]
        finally:
            os.close(fd)
