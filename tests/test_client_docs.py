"""docs/client.md's Python examples, and README.md's, run as written against the real service
on loopback.

Each example is taken from the document itself, so an example that stops working (a renamed
argument, another return shape) fails here instead of in a reader's hands. Only the quick
start's service URL and its example.com video are replaced (by a service of this test's own and
the loopback media server); the names the other examples take as given (`client`, `video`,
`url`, `verify`, ...) are provided, and what each example computed is checked against the
source bytes.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import pytest
from blake3 import blake3

from tests.support import VidcacheServer, wait_until
from vidcache_client import VidCacheClient

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "client.md"
MiB = 1 << 20


def example(containing: str, doc: Path = DOC) -> str:
    """The one Python example of `doc` whose code contains `containing`."""
    blocks = re.findall(r"^```python\n(.*?)^```", doc.read_text(), re.DOTALL | re.MULTILINE)
    found = [block for block in blocks if containing in block]
    assert len(found) == 1, f"{len(found)} examples in {doc} contain {containing!r}"
    return str(found[0])


def run(code: str, namespace: dict[str, Any], doc: Path = DOC) -> dict[str, Any]:
    exec(compile(code, str(doc), "exec"), namespace)
    return namespace


def test_the_examples_of_docs_client_md_run_as_written(
    tmp_path: Path, media_url: str, videos: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    source = videos["big.mp4"].read_bytes()  # over 9 MiB: the digests example's page is in it
    with VidcacheServer(tmp_path / "data") as server, \
            VidCacheClient(server.url, timeout=120) as client:
        monkeypatch.chdir(tmp_path)  # the quick start downloads to a relative path

        quick_start = example("with VidCacheClient(")
        for placeholder in ("http://127.0.0.1:8020", "https://example.com/a.mp4"):
            assert placeholder in quick_start
        quick_start = quick_start.replace("http://127.0.0.1:8020", server.url).replace(
            "https://example.com/a.mp4", f"{media_url}/big.mp4")
        done = run(quick_start, {})
        video = done["video"]
        assert video == blake3(source).hexdigest()
        assert done["result"]["status"] == "new"
        assert done["header"] == source[:65_536]
        assert (tmp_path / "a.mp4").read_bytes() == source
        shown = capsys.readouterr().out.splitlines()
        assert shown[:2] == ["new", f"{len(source)} {done['meta']['duration_s']} "
                                    f"['{media_url}/big.mp4']"]
        assert f"{video} {done['result']['file_path']}" in shown
        assert client.get_meta(video) is None  # its last step deletes the video

        video = client.ingest(f"{media_url}/big.mp4", "videos")["hash"]
        verified: list[int] = []

        def verify(content_hash: str, offset: int, hex_digest: str) -> None:
            chunk_size = digests["page"]["chunk_size"]
            assert content_hash == video
            assert blake3(source[offset:offset + chunk_size]).hexdigest() == hex_digest
            verified.append(offset)

        digests = {"client": client, "video": video, "verify": verify}
        run(example("client.get_chunk_digests(video,"), digests)
        chunk_size = digests["page"]["chunk_size"]
        assert verified == list(range(8 * MiB, 9 * MiB, chunk_size))

        run(example("client.list_videos_page(after=after"), {"client": client})
        assert capsys.readouterr().out.splitlines() == [
            f"{video} {client.get_meta(video)['file_path']}"]  # type: ignore[index]

        other = f"{media_url}/b.mp4"
        ingesting = run(example("client.ingests()"), {"client": client, "threading": threading,
                                                      "url": other})
        # its reporting thread ends within its 1 s wait once told: not after the client closes
        wait_until(lambda: not any(thread.name.endswith("(report)")
                                   for thread in threading.enumerate()),
                   timeout=10, what="the example's reporting thread to end")
        assert ingesting["result"]["hash"] == blake3(videos["b.mp4"].read_bytes()).hexdigest()
        for line in capsys.readouterr().out.splitlines():  # the report of each second, if any
            phase, received, expected = line.split()
            assert phase in {"queued", "downloading", "validating", "phash", "frames", "audio",
                             "storing"}
            assert int(received) <= int(expected) == videos["b.mp4"].stat().st_size

        used: list[bytes] = []
        buffers = run(example("client.read_range_into(video, 8 << 20,"), {
            "client": client, "video": video, "check_and_use": lambda block: used.append(
                bytes(block))})
        assert buffers["n"] == 4 * MiB
        assert b"".join(used) == b"".join(buffers["blocks"]) == source[8 * MiB:12 * MiB]

        kept: list[dict[str, Any] | None] = []
        opened = run(example("client.open_video_into(video,"), {
            "client": client, "video": video, "keep_digests": kept.append})
        assert opened["n"] == MiB and opened["first"] == source[:MiB]
        assert capsys.readouterr().out == f"{len(source)}\n"
        assert len(kept) == 1 and kept[0] is not None and kept[0]["first_chunk"] == 0
        assert len(kept[0]["digests"]) == kept[0]["chunk_count"]  # the video is under 256 MiB

        retried = run(example("except VidCacheError as exc:"), {
            "client": client, "video": video, "start": 1000, "end": 1999})
        assert retried["data"] == source[1000:2000]


def test_the_example_of_the_readme_runs_as_written(
    vidcache_server: VidcacheServer, media_url: str, videos: dict[str, Path],
) -> None:
    readme = ROOT / "README.md"
    code = example("with VidCacheClient(", readme)
    for placeholder in ("http://127.0.0.1:8020", "https://example.com/v.mp4"):
        assert placeholder in code
    # c.mkv: perceptually distinct from every other test video, so its own hash wherever stored
    done = run(code.replace("http://127.0.0.1:8020", vidcache_server.url).replace(
        "https://example.com/v.mp4", f"{media_url}/c.mkv"), {}, readme)
    source = videos["c.mkv"].read_bytes()
    assert done["result"]["hash"] == blake3(source).hexdigest()
    assert done["head"] == source[:1024]
