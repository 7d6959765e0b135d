"""The ingest pipeline, in this order:

1. URL lookup: a URL seen before (compared as store.url_alias stores it: without its
   `user:password@`, a digest for each secret of its query) is a `url_alias` of its video;
   nothing is downloaded.
2. Download to a temp file, hashing on the fly (download.py). The room promised to it on the
   disk (space.py), with its margin for the frames and the index's update of steps 5 and 6,
   is held until the ingest ends.
3. Exact dedup: the hash is stored -> `duplicate`, the URL becomes an alias.
4. ffprobe validation (422 "not a video: ...").
5. Perceptual dedup: the nearest stored video that media.near_duplicate matches, whose still
   frames look alike up close (frame_check.py) and that sounds the same (audio.py, if both
   have sound); both checked only for such a candidate, and one that cannot be checked is not
   merged with (a disk without room for the frames fails the ingest) -> `duplicate` with
   `phash_distance`, the URL becomes its alias and the new bytes are dropped.
6. Otherwise `new`: the blob is moved into place and its record committed.

`progress` (progress.py, GET /ingests) is told the phase as each step begins: `downloading`
(2), `validating` (4), `phash` (5's sampling and hashing), `frames` (5's frame check), `audio`
(5's audio check), `storing` (5's search and decision, and 6).

Step 5 searches an in-memory index of every stored video's perceptual hash (phash_index.py),
which the Ingestor fills from the store at start and keeps in step with its own adds and
deletes (so deletions go through `Ingestor.delete`).

Concurrency: one ingest per URL at a time (a second request for the URL waits and then finds
the alias), one per content hash at a time (same bytes under two URLs are probed once), and
step 5's compare-and-commit and every deletion run one at a time under the Ingestor's own
lock, so two re-encodes arriving together cannot both become `new` and a matched video cannot
vanish before its alias is added. The frame and audio checks decode outside that lock, then
search again. Reads never take that lock: a search does not hold them up.
Locks are always taken URL -> hash -> decide -> store.

Shutdown: `stop` ends the ingests running (their decoders killed, their downloads cut) and
refuses new downloads and decoders, each with ShuttingDown (503); one already deciding goes on
to its end, so a video is stored whole or not at all. `wait_stopped` lets the store close only
once they are over.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vidcache import audio, frame_check, media
from vidcache.download import Downloader, parse_url
from vidcache.errors import (
    IndexUnreadable,
    ShuttingDown,
    StorageError,
    ToolStopped,
    VidcacheError,
)
from vidcache.locks import KeyedLocks
from vidcache.phash_index import PhashIndex
from vidcache.progress import IngestProgress
from vidcache.store import NewVideo, Store, VideoRecord, check_location, check_meta, url_alias
from vidcache.tools import Tools
from vidcache_client._credentials import without_credentials

log = logging.getLogger(__name__)

Status = Literal["new", "duplicate", "url_alias"]

# How many of the stored videos whose frames match a new one are checked (frames up close,
# sound) against it, nearest first: others are not merged with it (several videos of one
# picture and length are a channel's music tracks, each candidate decodes both videos).
CANDIDATES = 4

# An ingest stopped at shutdown ends in milliseconds (its decoder is killed, its download cut);
# one flushing a large download to a slow disk may take longer.
STOP_TIMEOUT = 1


@dataclass(frozen=True)
class IngestResult:
    content_hash: str
    status: Status
    file_path: str
    phash_distance: int | None = None


class Ingestor:
    def __init__(self, *, store: Store, downloader: Downloader, phash_threshold: int,
                 tools: Tools, max_meta_bytes: int, max_meta_depth: int) -> None:
        self._store = store
        self._downloader = downloader
        self._threshold = phash_threshold
        self._tools = tools
        self._max_meta_bytes = max_meta_bytes
        self._max_meta_depth = max_meta_depth
        self._url_locks = KeyedLocks()
        self._hash_locks = KeyedLocks()
        self._decide = threading.Lock()
        self._phashes = PhashIndex(media.FRAMES)
        self._running = 0
        self._running_changed = threading.Condition()
        self._stopped_at: float | None = None
        for content_hash, encoded, duration_s in store.phashes():
            self._phashes.add(content_hash, media.decode_phash(encoded), duration_s)

    def ingest(self, *, url: str, bucket: str, prefix: str = "",
               meta: dict[str, Any] | None = None,
               progress: IngestProgress) -> IngestResult:
        """Run the pipeline for one URL, telling `progress` its phases and bytes; raises a
        VidcacheError naming what went wrong."""
        with self._running_changed:
            self._running += 1
        try:
            check_location(bucket, prefix)
            check_meta(meta or {}, max_bytes=self._max_meta_bytes, max_depth=self._max_meta_depth)
            parse_url(url)
            with self._url_locks.hold(url_alias(url)):
                result = self._ingest_new_url(url, bucket, prefix, meta or {}, progress)
        except VidcacheError as exc:
            log.warning("ingest %s failed (%d): %s", without_credentials(url), exc.status_code,
                        exc)
            raise
        finally:
            with self._running_changed:
                self._running -= 1
                self._running_changed.notify_all()
        distance = "" if result.phash_distance is None else \
            f" (phash distance {result.phash_distance})"
        log.info("ingest %s: %s %s%s", without_credentials(url), result.status,
                 result.content_hash, distance)
        return result

    def _ingest_new_url(self, url: str, bucket: str, prefix: str, meta: dict[str, Any],
                        progress: IngestProgress) -> IngestResult:
        known = self._store.lookup_url(url)
        if known is not None:
            return _result(known, "url_alias")
        progress.enter("downloading")
        # its room and temp file held until it is stored or has failed
        with (self._downloader.fetch(url, progress) as download,
              self._hash_locks.hold(download.content_hash)):
            duplicate = self._store.add_alias(url, download.content_hash)
            if duplicate is not None:
                return _result(duplicate, "duplicate")
            progress.enter("validating")
            info = media.probe(download.path, self._tools)
            progress.enter("phash")
            phash = media.perceptual_hash(download.path, info, self._tools,
                                          work_dir=self._store.tmp_dir)
            progress.enter("storing")
            # candidate -> whether it passed the frame and audio checks
            checked: dict[str, bool] = {}
            # this video's still frames at a size compared at: decoded once for candidates
            # of one size (a channel's tracks under one cover picture)
            still: dict[tuple[int, int], list[frame_check.Frame | None]] = {}
            while True:
                with self._decide:
                    match, unchecked = self._match(phash, info.duration_s, checked)
                    if match is not None:
                        matched_hash, distance = match
                        record = self._store.add_alias(url, matched_hash)
                        assert record is not None  # deletions wait for the decide lock
                        return _result(record, "duplicate", distance)
                    if unchecked is None:
                        record = self._store.add_video(
                            NewVideo(content_hash=download.content_hash, bucket=bucket,
                                     prefix=prefix, extension=info.extension,
                                     size_bytes=download.size, duration_s=info.duration_s,
                                     mime_type=info.mime_type, meta=meta,
                                     phash=media.encode_phash(phash),
                                     chunk_size=download.chunk_size,
                                     chunk_digests=download.chunk_digests),
                            url=url, temp_path=download.path)
                        self._phashes.add(record.content_hash, phash, info.duration_s)
                        return _result(record, "new")
                # checked outside the lock, which other ingests' decisions and deletions
                # take; the next turn searches again
                checked[unchecked] = self._alike(url, download.path, info, still, unchecked,
                                                 progress)
                progress.enter("storing")

    def stop(self) -> None:
        """End the ingests running and refuse new downloads and decoders: the server is
        shutting down."""
        with self._running_changed:
            if self._stopped_at is None:
                self._stopped_at = time.monotonic()
        self._tools.stop()
        self._downloader.stop()

    def wait_stopped(self) -> int:
        """After `stop`: wait until the ingests have ended, up to STOP_TIMEOUT after the stop;
        returns how many still run."""
        with self._running_changed:
            assert self._stopped_at is not None, "stop() first"
            deadline = self._stopped_at + STOP_TIMEOUT
            self._running_changed.wait_for(lambda: self._running == 0,
                                           timeout=max(0.0, deadline - time.monotonic()))
            return self._running

    def delete(self, content_hash: str) -> bool:
        """Store.delete, keeping the index in step; False if there was no such video."""
        with self._decide:
            deleted = self._store.delete(content_hash)
            if deleted:
                self._phashes.remove(content_hash)
            return deleted

    def _candidates(self, phash: media.PerceptualHash,
                    duration_s: float) -> list[tuple[str, int]]:
        """(hash, distance) of the CANDIDATES stored videos perceptually nearest to `phash`
        that count as the same video by their frame hashes, nearest first."""
        return self._phashes.matches(phash, duration_s, self._threshold, CANDIDATES)

    def _match(self, phash: media.PerceptualHash, duration_s: float,
               checked: dict[str, bool]) -> tuple[tuple[str, int] | None, str | None]:
        """With the decide lock held: ((hash, distance) of the stored video this one is, None),
        or (None, the hash of a candidate still to be checked), or (None, None): it is new.
        The first candidate that passed the checks is it."""
        for candidate in self._candidates(phash, duration_s):
            same = checked.get(candidate[0])
            if same is None:
                return None, candidate[0]
            if same:
                return candidate, None
        return None, None

    def _alike(self, url: str, path: Path, info: media.MediaInfo,
               still: dict[tuple[int, int], list[frame_check.Frame | None]],
               content_hash: str, progress: IngestProgress) -> bool:
        """Whether the new video at `path` is the stored video `content_hash` up close: their
        still frames alike (frame_check.py; the new video's taken from `still` by the size
        compared at, or decoded into it), and their sound, if both have some (audio.py).
        False if it cannot be told, as a false match loses a video and storing both loses
        nothing; but ShuttingDown and ToolStopped (ffmpeg ended by a signal: try again),
        StorageError (no room for the frames) and IndexUnreadable (the stored video's record)
        raise, failing the ingest as at the other steps: taken as "not alike", a full disk or a
        damaged index would store the video apart, a spare copy."""
        unknown = "frames could not be compared up close"
        try:
            record = self._store.get(content_hash)
            if record is None:  # deleted meanwhile: the next search does not find it
                return False
            stored_path = self._store.blob_path(record)
            stored = media.probe(stored_path, self._tools)
            progress.enter("frames")
            at = frame_check.size(info, stored)
            if at not in still:
                still[at] = frame_check.still_frames(path, info, self._tools, at,
                                                     work_dir=self._store.tmp_dir)
            mine = still[at]
            difference = None
            if any(frame is not None for frame in mine):  # else the other need not be decoded
                difference = frame_check.difference(mine, frame_check.still_frames(
                    stored_path, stored, self._tools, at, work_dir=self._store.tmp_dir))
            if difference is not None and difference > frame_check.THRESHOLD:
                log.info("ingest %s: its frames match stored %s by their hashes, not up close "
                         "(frame difference %.1f at %dx%d): not merged with it",
                         without_credentials(url), content_hash, difference, *at)
                return False
            if info.audio_stream is None or stored.audio_stream is None:
                return True  # nothing to compare: the frames decide
            unknown = "sound could not be compared"
            progress.enter("audio")
            times = audio.windows(info.duration_s, stored.duration_s)
            distance = audio.distance(
                audio.fingerprint(path, info.audio_stream, times, self._tools),
                audio.fingerprint(stored_path, stored.audio_stream, times, self._tools))
        # nothing is known: 503, try again; 507, make room; 500, the index: as elsewhere
        except (ShuttingDown, ToolStopped, StorageError, IndexUnreadable):
            raise
        except VidcacheError as exc:
            log.warning("ingest %s: its frames match stored %s, whose %s (%s): not merged "
                        "with it", without_credentials(url), content_hash, unknown, exc)
            return False
        if distance > audio.THRESHOLD:
            log.info("ingest %s: its frames match stored %s, its sound does not (audio "
                     "distance %.3f): not merged with it", without_credentials(url),
                     content_hash, distance)
        return distance <= audio.THRESHOLD


def _result(record: VideoRecord, status: Status, distance: int | None = None) -> IngestResult:
    return IngestResult(record.content_hash, status, record.file_path, distance)
