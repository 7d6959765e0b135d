"""Whether `--cache-size` fits in the memory a vcfs mount may use.

The block cache fills up to --cache-size as videos are read, readahead included, so a cache
bigger than a limit the daemon runs under is only found out once reads reach the limit: past
the machine's memory or a cgroup's, the kernel's OOM killer ends the daemon and leaves a dead
mount ("Transport endpoint is not connected" for every player; measured: a 1 GiB cache under a
200 MiB cgroup was killed 164 MiB into a read); past `ulimit -d` or `ulimit -v`, allocations
and thread starts fail and every read that needs a new block fails (EIO; ENOMEM where an
allocation failed; 59 MiB into a read under 200 MiB), and a busy mount stops once libfuse
cannot allocate a new FUSE thread's receive buffer. `vcfs mount` refuses such a cache before
it mounts (`cache_refusal`), and warns in its log (`cache_warnings`) of one that fits the
limit but not what is free now, or not what vcfs uses besides when busy (measured: 84 and 36
MiB caches, accepted in a 200 MiB cgroup, were OOM-killed under 60 concurrent readers).

The limits are read by `current_limits`; `limits` and the checks take them as values (tests).
"""

from __future__ import annotations

import re
import resource
from collections.abc import Callable
from dataclasses import dataclass

from vcfs.limits import FUSE_THREADS, THREAD_STACK
from vcfs.mountinfo import mounts
from vidcache_client._arguments import size_text

MIB = 1 << 20
GIB = 1 << 30
# An idle mount's own process, measured (Python 3.11, libfuse 3.14, x86-64): RSS 38 MB, data
# segment 36-39 MB, address space 117-118 MB (61 and 143 MB when its threads' stacks were 8 MiB
# each, see THREADS); rounded up.
_IDLE_RESIDENT = 48 * MIB
_IDLE_DATA = 48 * MIB
_IDLE_ADDRESS_SPACE = 128 * MIB
# What vcfs keeps besides the cache (docs/vcfs.md, the --cache-size row; vcfs.remote's
# RemoteConfig): up to 32 MiB of chunk digests, 8 MiB of verified edge chunks, ~20 MB of
# metadata of videos looked up by name, and up to 8 first blocks of at most 1 MiB. Not the
# listing (~1 KB per video), whose size the service has not been asked yet.
_KEPT_BESIDES = (32 + 8 + 20 + 8) * MIB
# More, in a mount busy with the most reads the kernel lets wait on it (vcfs.limits): the one
# or two blocks each waiting read fetches beyond a full budget, the copies of the bytes of
# each read being answered, freed heap glibc keeps for reuse (RSS stays at its high-water
# mark), the touched part of thread stacks (docs/vcfs.md, "Memory limits"). It grows with
# the reads, not the cache. Measured under 60 concurrent readers: 212 MiB resident besides a
# full 36 MiB cache (147 MiB besides 256 MiB), 116 MiB of it counted above; 84 and 36 MiB
# caches in a 200 MiB cgroup were OOM-killed under that load, where one reader at a time
# stayed under 100 MiB. Since reads are answered through libfuse's read_buf, which holds no
# buffer while a read waits, another load of 60 readers took 83-116 MiB besides a 36 MiB
# cache (134-142 before): kept, for the first load was not measured again. With 1 MiB blocks.
_BUSY = 112 * MIB
# The blocks fetched beyond a full budget are bounded by the HTTP workers, as many as the FUSE
# threads (vcfs.limits): each fetch attempt makes its blocks on one, and a read's run is its own
# bytes and at most one more block. So each MiB a block has beyond 1 MiB adds up to 2 MiB per
# worker to _BUSY. Measured under 60 readers of 1 MiB at random offsets of two 400 MB videos,
# a 32 MiB cache: 132, 323, 635-649 and 1199 MiB resident besides the cache with 1, 4, 8 and
# 16 MiB blocks; 156 and 746 with 1 and 8 MiB blocks and every read across two (64-84 more per
# MiB of block: readers of the same blocks share their fetches).
_BLOCKS_BEYOND_BUDGET = 2 * FUSE_THREADS
# Threads under full load: libfuse's FUSE threads, as many fetch threads and HTTP workers
# (vcfs.limits), readahead's 4, the main thread and a few more (160-197 were counted). Each has a
# stack of THREAD_STACK, whatever `ulimit -s` says (vcfs.cli.set_thread_stacks), the FUSE
# threads that of FUSE_THREAD_STACK if it asks for more; only the part touched is resident.
THREADS = 3 * FUSE_THREADS + 8
# A cgroup v1 memory limit at or above this is "no limit" (v1 shows 9223372036854771712).
_CGROUP_V1_UNLIMITED = 1 << 62


@dataclass(frozen=True, slots=True)
class Limit:
    """A bound on the daemon's memory: `what` it is (said in messages, {size} its size), its
    `size`, and what vcfs needs under it besides the cache: `besides` always, `busy` more
    under full load, `stacks` of it the threads' stacks (mapped whole, so counted whole in
    ulimit -d and -v)."""

    what: str
    size: int
    besides: int
    busy: int
    stacks: int = 0
    fix: str = ""  # how to raise it, for the messages

    def named(self) -> str:
        return self.what.format(size=size_about(self.size))

    @property
    def room(self) -> int:
        """The largest cache that fits."""
        return self.size - self.besides


@dataclass(frozen=True, slots=True)
class MemoryFacts:
    """What `limits` are made of, as read by `current_limits` (None: no such limit)."""

    mem_total: int | None
    mem_available: int | None
    data: int | None  # RLIMIT_DATA, soft
    address_space: int | None  # RLIMIT_AS, soft
    cgroup: tuple[str, str, int] | None  # (cgroup path, file, limit) of the tightest cgroup


def busy_besides(block_size: int) -> int:
    """What a mount with blocks of `block_size` uses under full load beyond what it keeps
    besides the cache anyway, stacks not counted (_BUSY)."""
    return _BUSY + _BLOCKS_BEYOND_BUDGET * max(block_size - MIB, 0)


def limits(facts: MemoryFacts, *, fuse_stack: int = THREAD_STACK,
           block_size: int = MIB) -> list[Limit]:
    """The limits a cache must fit in, the machine's memory first; `fuse_stack` is the stack
    of each FUSE thread (vcfs.cli.fuse_thread_stack), `block_size` the mount's --block-size."""
    stacks = FUSE_THREADS * fuse_stack + (THREADS - FUSE_THREADS) * THREAD_STACK
    busy = busy_besides(block_size)
    found = []
    if facts.mem_total is not None:
        found.append(Limit("this machine's memory ({size})", facts.mem_total,
                           _IDLE_RESIDENT + _KEPT_BESIDES, busy))
    if facts.cgroup is not None:
        path, name, size = facts.cgroup
        braced = path.replace("{", "{{").replace("}", "}}")
        found.append(Limit(f"the memory limit of its cgroup {braced} ({{size}}, {name})", size,
                           _IDLE_RESIDENT + _KEPT_BESIDES, busy,
                           fix=f"raise its {name}"))
    if facts.data is not None:
        found.append(Limit("its data limit ({size}, ulimit -d)", facts.data,
                           _IDLE_DATA + _KEPT_BESIDES, busy + stacks, stacks,
                           fix="raise the limit (systemd: LimitDATA=)"))
    if facts.address_space is not None:
        found.append(Limit("its address-space limit ({size}, ulimit -v)", facts.address_space,
                           _IDLE_ADDRESS_SPACE + _KEPT_BESIDES, busy + stacks,
                           stacks,
                           fix="raise the limit (systemd: LimitAS=)"))
    return found


def size_about(size: int, *, down: bool = False) -> str:
    """`size` to a tenth of its unit for a message (23.5 GiB, 200 MiB), rounded `down` for a
    bound not to exceed."""
    for unit, name in ((GIB, "GiB"), (MIB, "MiB"), (1 << 10, "KiB")):
        if size >= unit:
            tenths = size * 10 // unit if down else round(size * 10 / unit)
            return f"{tenths // 10} {name}" if tenths % 10 == 0 else f"{tenths / 10} {name}"
    return f"{size} bytes"


def cache_refusal(cache_size: int, found: list[Limit]) -> str | None:
    """Why a cache of `cache_size` bytes cannot fit, for the tightest limit it exceeds; None if
    it fits them all."""
    over = [limit for limit in found if cache_size > limit.room]
    if not over:
        return None
    limit = min(over, key=lambda limit: limit.room)
    start = f"--cache-size {size_text(cache_size)} is more than {limit.named()} can hold"
    if limit.room < MIB:
        return (f"{start}: vcfs needs ~{size_about(limit.besides)} there besides its cache; "
                f"{limit.fix or 'use a machine with more memory'}")
    return (f"{start} besides the ~{size_about(limit.besides)} vcfs needs otherwise: give a "
            f"--cache-size of at most {size_about(limit.room, down=True)}"
            f"{f', or {limit.fix}' if limit.fix else ''}")


def cache_warnings(cache_size: int, facts: MemoryFacts, found: list[Limit]) -> list[str]:
    """What may still go wrong with a cache that fits every limit: the memory free now is
    less (it changes: a warning, not a refusal), or a limit cannot also hold what vcfs uses
    when busy (it fits while vcfs is not)."""
    warnings = []
    besides = _IDLE_RESIDENT + _KEPT_BESIDES
    if facts.mem_available is not None and cache_size + besides > facts.mem_available:
        warnings.append(
            f"--cache-size {size_text(cache_size)} is more than the memory available now "
            f"({size_about(facts.mem_available)}, MemAvailable) can hold besides the "
            f"~{size_about(besides)} vcfs needs otherwise: once the cache fills, the system "
            "may swap, or its OOM killer end vcfs (a dead mount)")
    for limit in found:
        if cache_size + limit.besides + limit.busy <= limit.size:
            continue
        largest = limit.size - limit.besides - limit.busy
        advice = (f"give a --cache-size of at most {size_about(largest, down=True)}"
                  if largest >= MIB else "give a smaller --cache-size")
        if limit.stacks:
            warnings.append(
                f"{limit.named()} holds --cache-size {size_text(cache_size)}, but not also up "
                f"to ~{size_about(limit.busy)} more that vcfs uses when busy, "
                f"{size_about(limit.stacks)} of it the stacks of its up to {THREADS} threads: "
                f"under such load reads may fail (EIO, ENOMEM), and the mount stop; {advice}, or "
                f"{limit.fix}")
        else:
            warnings.append(
                f"{limit.named()} holds --cache-size {size_text(cache_size)}, but not also up "
                f"to ~{size_about(limit.busy)} more that vcfs uses when busy (for 48 reads at "
                f"once): under such load the kernel's OOM killer may end it (a dead "
                f"mount); {advice}{f', or {limit.fix}' if limit.fix else ''}")
    return warnings


def _rlimit(which: int) -> int | None:
    soft = resource.getrlimit(which)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo's fields in bytes."""
    return {match.group(1): int(match.group(2)) * 1024
            for match in re.finditer(r"^(\w+):\s+(\d+) kB$", text, re.MULTILINE)}


def cgroup_limit(proc_cgroup: str, mountinfo: str,
                 read: Callable[[str], str | None]) -> tuple[str, str, int] | None:
    """The tightest memory limit of the cgroups a process is in (its own and their parents'),
    cgroup v2's memory.max or v1's memory.limit_in_bytes: (cgroup path, file, bytes), or None.
    `proc_cgroup` and `mountinfo` are the process's /proc/self/cgroup and mountinfo, `read`
    a file's text (None if it cannot be read)."""
    tightest: tuple[str, str, int] | None = None
    for line in proc_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:
            name, mount = "memory.max", _cgroup_mount(mountinfo, "cgroup2", None)
        elif "memory" in controllers.split(","):
            name, mount = "memory.limit_in_bytes", _cgroup_mount(mountinfo, "cgroup", "memory")
        else:
            continue
        if mount is None:
            continue
        mount_point, mount_root = mount
        if path != mount_root and not path.startswith(mount_root.rstrip("/") + "/"):
            continue  # its cgroup is not under the part of the hierarchy mounted here
        inside = path[len(mount_root):].strip("/")
        parts = inside.split("/") if inside else []
        for depth in range(len(parts), -1, -1):
            directory = "/".join([mount_point.rstrip("/"), *parts[:depth]])
            size = _cgroup_bytes(read(f"{directory}/{name}"))
            if size is not None and (tightest is None or size < tightest[2]):
                cgroup = "/".join([mount_root.rstrip("/"), *parts[:depth]]) or "/"
                tightest = (cgroup, name, size)
    return tightest


def _cgroup_mount(mountinfo: str, fstype: str, option: str | None) -> tuple[str, str] | None:
    """(mount point, root) of the first mount of `fstype` whose super options have `option`."""
    for mount in mounts(mountinfo):
        if mount.fstype == fstype and (option is None
                                       or option in mount.super_options.split(",")):
            return mount.mount_point, mount.root
    return None


def _cgroup_bytes(text: str | None) -> int | None:
    value = (text or "").strip()
    if not value.isdigit():
        return None  # "max", or no such file
    size = int(value)
    return None if size >= _CGROUP_V1_UNLIMITED else size


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as file:
            return file.read()
    except OSError:
        return None


def current_limits() -> MemoryFacts:
    """This process's limits, read from /proc, getrlimit and the cgroup file system."""
    fields = meminfo(_read("/proc/meminfo") or "")
    proc_cgroup, mountinfo = _read("/proc/self/cgroup"), _read("/proc/self/mountinfo")
    return MemoryFacts(
        mem_total=fields.get("MemTotal"),
        mem_available=fields.get("MemAvailable"),
        data=_rlimit(resource.RLIMIT_DATA),
        address_space=_rlimit(resource.RLIMIT_AS),
        cgroup=(cgroup_limit(proc_cgroup, mountinfo, _read)
                if proc_cgroup and mountinfo else None),
    )
