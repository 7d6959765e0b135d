"""`vcfs mount URL MOUNTPOINT [options]` and `vcfs unmount MOUNTPOINT`.

`mount` stays in the foreground (like `rclone mount`): logs go to stderr, Ctrl-C or SIGTERM
unmounts and exits, and the final counters are logged. `--daemon` re-runs the same mount in
the foreground as a detached child and waits until the mount answers (or the child failed):
the child reports "ok" over an inherited pipe, so every start-up error is printed by the
command the user typed, with a non-zero exit code, before anything detaches.

Before mounting, everything that can be checked is checked, each with a one-line error: the
cache fits in the memory vcfs may use (vcfs.memory), FUSE is usable (/dev/fuse exists and
this user may open it, fusermount3 is there and would accept allow_other), the mount point
exists, is an empty directory and is not mounted (a stale mount left by a crashed vcfs,
"Transport endpoint is not connected", is unmounted first), the token file (if any) holds a
token, the service answers /health, and it lets vcfs list its videos (a missing or wrong token
is named as such).

The token is read from a file, never taken on the command line, where any user could see it
in the process list; `--daemon` passes the file's path to its child, not the token, and the
URL without its `user:password@` (the whole URL goes in the child's environment).

`vcfs URL MOUNTPOINT -o OPT,...` (no command) is how mount(8) runs vcfs, through mount.fuse3,
for an /etc/fstab line of type fuse.vcfs: it is `vcfs mount URL MOUNTPOINT --daemon`, with
vcfs's own options spelled as -o ones (cache_size=2G), silent once mounted as mount(8)'s helpers
are; see `mount_helper_arguments`. With mount.fuse3's drop_privileges, MOUNTPOINT is /dev/fd/N,
a mount made already (see `fuse_fd`).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import logging
import logging.handlers
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from vcfs import __version__, mountinfo
from vcfs.blocks import BlockCache
from vcfs.errors import AccessDenied, RemoteUnavailable
from vcfs.limits import FUSE_THREADS, READS_WAITING, THREAD_STACK
from vcfs.memory import cache_refusal, cache_warnings, current_limits, limits
from vcfs.remote import Remote, RemoteConfig
from vcfs.threads import NoThread
from vidcache_client._arguments import (
    HelpFormatter,
    RawDescriptionHelpFormatter,
    TokenFileError,
    parse_size,
    positive_seconds,
    read_token_file,
    service_url,
    signal_name,
    size_text,
)
from vidcache_client._credentials import without_credentials
from vidcache_client._malloc import set_malloc_options
from vidcache_client._validate import is_decimal

log = logging.getLogger("vcfs")

KIB = 1 << 10
MIB = 1 << 20
_LOG_LEVELS = ("debug", "info", "warning", "error")
_READAHEAD_MAX = 16 * MIB
# A vcfs mount's type in mountinfo: `vcfs unmount` unmounts no other (see is_vcfs_type).
_FSTYPE = "fuse.vcfs"
# Keywords of the FUSE helper that `-o` would reach instead of mount options, and `daemon`,
# which libfuse knows no more than as "unknown option" (an fstab line's vcfs detaches anyway).
_HELPER_KEYWORDS = frozenset({"daemon", "debug", "encoding", "foreground", "nothreads",
                              "raw_fi"})
# Other words -o would pass on that are no mount options, with what to use instead: libfuse
# says "unknown option" only once the service has been contacted. status_fd would be the
# --daemon child's internal --status-fd, which -o (and so an fstab line) never sets.
_NOT_MOUNT_OPTIONS = {"help": "vcfs mount --help lists the options",
                      "version": "vcfs --version shows the version",
                      "status_fd": "internal to --daemon, which sets it itself"}
# Options of an /etc/fstab line that are for mount(8) or systemd, not for the file system:
# mount(8) and mount.fuse3 drop most of them, but not all (nor does a direct call). rw too:
# `defaults` and habit put it on fstab lines, and the mount is read-only whatever it says.
_FSTAB_KEYWORDS = frozenset({"defaults", "auto", "noauto", "user", "users", "nouser", "owner",
                             "group", "nofail", "_netdev", "rw"})
# The service's default digest chunk: a first block fetched with a lookup is verified whole,
# so it must be made of whole chunks (else it is dropped and fetched again).
_DIGEST_CHUNK = 256 * KIB
# A stat-only lookup (ls -l of unlisted names, a player's probe of its playlist) costs the first
# block: no more than a probe reads anyway, not a 64 MiB download per name.
_FIRST_BLOCK_MAX = MIB
# How long `--daemon` waits for the child's mount beyond the service deadline.
_DAEMON_START_MARGIN = 30.0
# The --daemon child's URL, credentials and all: in its environment, which /proc shows to its
# owner and root only, not on its command line, which the process list shows to every user.
_DAEMON_URL = "VCFS_DAEMON_URL"
# A mount point naming an open /dev/fuse descriptor whose mount is made already: what
# mount.fuse3 -o drop_privileges passes (libfuse 3.3+ serves it as it is, and never unmounts it).
_FUSE_FD = re.compile(r"/dev/fd/(\d+)")
_FUSE_DEVICE = os.makedev(10, 229)  # /dev/fuse: the misc major, FUSE_MINOR
# fusermount3's configuration: its user_allow_other lets users other than root allow_other.
_FUSE_CONF = "/etc/fuse.conf"
# Two malloc arenas for all of vcfs's threads (see tune_malloc).
_MALLOC_ARENAS = 2
# Free heap glibc keeps for reuse instead of returning it: a readahead pipeline's worth of blocks.
_TRIM_THRESHOLD = 64 * MIB
# glibc's largest mmap threshold (HEAP_MAX_SIZE / 2 on 64-bit): bigger blocks are mapped anyway.
_MAX_MMAP_THRESHOLD = 32 * MIB
# The stack size libfuse gives the threads it starts (fuse_loop_mt.c, libfuse 2.9 to 3.x: read
# with getenv and atoi as each thread starts; without it, glibc's default, `ulimit -s`).
_FUSE_THREAD_STACK = "FUSE_THREAD_STACK"


class StartupError(Exception):
    """Something that keeps vcfs from mounting; printed as one line, exit code 1."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MountOptions:
    url: str
    mountpoint: str  # absolute, symlinks resolved; or /dev/fd/N (see fuse_fd)
    fuse_fd: int | None  # N of a /dev/fd/N mount point
    cache_size: int
    block_size: int
    fuse_stack: int  # libfuse's threads' stack (see fuse_thread_stack)
    readahead_max: int
    timeout: float
    fuse_options: tuple[str, ...]
    log_level: str
    log_file: str | None  # absolute
    raise_readahead: bool
    # What may still go wrong with a cache that fits the memory limits (vcfs.memory), found as
    # mount_options reads them (once); logged by run_mount once logging is set up. Not compared:
    # they depend on the memory free at the time, not on the options.
    memory_warnings: tuple[str, ...] = field(compare=False)
    first_block_with_meta: bool = True
    # None: a quarter of cache_size (see vcfs.blocks, passed blocks)
    keep_passed: int | None = None
    token_file: str | None = None  # absolute
    token: str | None = field(default=None, repr=False)  # read from token_file


def _mountpoint(text: str) -> str:
    if not text:  # it would be the current directory: `vcfs mount URL "$UNSET"`
        raise argparse.ArgumentTypeError("must name a directory, not ''")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vcfs",
        description="Mount a vidcache service as a read-only filesystem of video files.",
        formatter_class=RawDescriptionHelpFormatter,
        epilog=(
            "As mount(8)'s helper, for an /etc/fstab line of type fuse.vcfs:\n"
            "  vcfs URL MOUNTPOINT -o OPTION[,OPTION...]\n"
            "is `vcfs mount URL MOUNTPOINT --daemon`, silent once mounted, the mount command's\n"
            "options spelled as -o ones (cache_size=1G, token_file=/etc/vcfs/token,\n"
            "log_file=/var/log/vcfs.log), mount(8)'s own (defaults, noauto, nofail, _netdev,\n"
            "x-systemd.*) ignored, the others passed to FUSE (allow_other). See `vcfs mount\n"
            "--help`."
        ),
    )
    parser.add_argument("--version", action="version", version=f"vcfs {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mount = commands.add_parser(
        "mount",
        help="mount the service's videos at MOUNTPOINT",
        description=(
            "Mount the vidcache service at URL on MOUNTPOINT: every stored video opens as\n"
            "MOUNTPOINT/by-hash/<hash>.<ext>, read on demand with HTTP range requests through\n"
            "an in-memory block cache. `ls` shows them all, except on a vidcache 1.x service\n"
            "(it has no listing): there by-hash/ lists nothing, though each video opens by name.\n"
            "Counters: MOUNTPOINT/.vcfs/stats.\n"
            "Sizes are bytes or take K, M, G, T suffixes (powers of 1024): 256M, 1G, 1048576."
        ),
        epilog=(
            "examples:\n"
            "  vcfs mount http://127.0.0.1:8020 /mnt/vc\n"
            "  vcfs mount http://127.0.0.1:8020 /mnt/vc --daemon --log-file /var/log/vcfs.log\n"
            "  vcfs mount http://cache:8020 /mnt/vc --cache-size 1G -o allow_other\n"
            "\n"
            "exit status: 0 once unmounted (or, with --daemon, once mounted); 1 if it cannot\n"
            "mount, with the reason on one line; 2 for an option it cannot parse; 130 for\n"
            "Ctrl-C before the mount is up (nothing is left mounted)"
        ),
        formatter_class=RawDescriptionHelpFormatter,
    )
    mount.add_argument("url", metavar="URL", type=service_url,
                       help="base URL of the vidcache service (http:// or https://)")
    mount.add_argument("mountpoint", metavar="MOUNTPOINT", type=_mountpoint,
                       help="an existing empty directory")
    mount.add_argument(
        "--cache-size", type=parse_size, default=256 * MIB, metavar="SIZE",
        help="memory for cached video blocks, readahead and blocks being fetched included "
        "(reads waiting on vcfs fetch what they need even beyond it: more memory when busy, "
        "the more with a bigger --block-size, see docs/vcfs.md); at least two blocks, and no "
        "more than fits, with what vcfs needs besides (~120M; ~200M of address space), in the "
        "machine's memory, its cgroup's memory limit, ulimit -d and ulimit -v (default: 256M)",
    )
    mount.add_argument(
        "--block-size", type=parse_size, default=MIB, metavar="SIZE",
        help="unit of caching and fetching, a multiple of 4K from 4K to 64M (default: 1M; "
        "blocks that are whole multiples of the service's digest chunks are verified as they "
        "arrive, smaller ones are fetched as whole chunks of up to 4M; blocks cutting bigger "
        "chunks are checked against their range only)",
    )
    mount.add_argument(
        "--readahead-max", type=parse_size, default=None, metavar="SIZE",
        help="largest readahead window per open file once it reads sequentially, at most "
        "half the cache size; 0 disables readahead (default: 16M, or half of a cache "
        "smaller than 32M)",
    )
    mount.add_argument(
        "--keep-passed", type=parse_size, default=None, metavar="SIZE",
        help="part of the cache kept for blocks a streaming reader has read past, evicted "
        "first, so a short seek back is served from memory; at most --cache-size (default: "
        "a quarter of --cache-size); 0 frees them at once, leaving the memory to other "
        "files' blocks: re-reads of a scan's past then go back to the service",
    )
    mount.add_argument(
        "--timeout", type=positive_seconds, default=30.0, metavar="SECONDS",
        help="give up on the service after retrying this long, then the operation (a read, a "
        "lookup, one page of a listing) fails with EIO (default: 30); a request silent for "
        "min(10, SECONDS/3) s is retried",
    )
    mount.add_argument(
        "--token-file", metavar="FILE",
        help="send the token in FILE (one line) as 'Authorization: Bearer <token>', for a "
        "service started with --token-file and --token-reads",
    )
    mode = mount.add_mutually_exclusive_group()
    mount.set_defaults(daemon=False)
    mode.add_argument(
        "--foreground", dest="daemon", action="store_false",
        help="stay in the foreground until unmounted or interrupted (the default)",
    )
    mode.add_argument(
        "--daemon", dest="daemon", action="store_true",
        help="detach once the mount is up; start-up errors are still reported here",
    )
    mount.add_argument(
        "-o", dest="fuse_options", action="append", default=[], metavar="OPT[,OPT...]",
        help="FUSE mount options (repeatable); vcfs always adds ro. allow_other: other users "
             "may read the mount (without it a root mount is root's alone); fsname=NAME: "
             "the name mount and df show (default vcfs); rw, subtype and the FUSE helper's "
             "debug, encoding, foreground, nothreads, raw_fi are refused, and daemon (use "
             "--daemon), help and version (use vcfs mount --help, vcfs --version); so is "
             "allow_other with allow_root (the owner and root only), and max_threads below vcfs's "
             f"own {FUSE_THREADS}",
    )
    mount.add_argument(
        "--log-level", choices=_LOG_LEVELS, default="info",
        help="debug also logs every read with its offset and size (default: info)",
    )
    mount.add_argument(
        "--log-file", metavar="PATH",
        help="append logs here instead of stderr, to a new file at PATH once this one is "
        "renamed or removed (logrotate); without it a --daemon keeps no log: its warnings "
        "until mounted are shown, its read errors and outage warnings are lost",
    )
    mount.add_argument(
        "--no-raise-readahead", dest="raise_readahead", action="store_false",
        help="leave the mount's kernel readahead (read_ahead_kb) alone; by default vcfs, "
        "when root, raises it to 1024 so the kernel sends 1 MiB reads instead of 128 KiB",
    )
    mount.add_argument(
        "--no-first-block", dest="first_block_with_meta", action="store_false",
        help="on a cold lookup of a video path (not from a recent listing) ask only for its "
        "metadata; by default vcfs also fetches the first block and the chunk digests at the "
        "same time, one round trip less before a player's first read, at the cost of one "
        "block per stat-only lookup (never with a --block-size that is not a multiple of "
        "256K, the service's digest chunk: such a block could not be verified alone; nor "
        "above 1M: a stat would cost the whole block)",
    )
    # Internal: the --daemon parent's pipe, told "ok" once the mount answers.
    mount.add_argument("--status-fd", type=int, help=argparse.SUPPRESS)

    unmount = commands.add_parser(
        "unmount", help="unmount a vcfs mount", formatter_class=HelpFormatter,
        description="Unmount MOUNTPOINT (also clears a stale mount left by a crashed vcfs).",
        epilog="exit status: 0 once unmounted; 1 if not (not mounted, not a vcfs mount, "
        "files still open, another user's mount), with the reason on one line",
    )
    unmount.add_argument("mountpoint", metavar="MOUNTPOINT", type=_mountpoint,
                         help="where vcfs is mounted (or a stale mount of a crashed vcfs)")
    unmount.add_argument(
        "-z", "--lazy", action="store_true",
        help="detach now even if files are open; unmounted when they are closed",
    )
    return parser


def mount_helper_arguments(
    arguments: Sequence[str], parser: argparse.ArgumentParser
) -> list[str]:
    """mount.fuse3's call for an fstab line `URL MOUNTPOINT fuse.vcfs OPTIONS`, `vcfs URL
    MOUNTPOINT -o OPTIONS`, as the arguments of `vcfs mount URL MOUNTPOINT --daemon`: mount(8)
    waits for its helper, which must detach once mounted, or say why not with a non-zero
    status. An option named as one of `mount`'s (cache_size=2G, token_file=/etc/vcfs/token,
    no_first_block) is that option, the mount(8)/systemd ones are dropped, the others are FUSE
    options (allow_other, and the dev, suid, ro, noatime... mount.fuse3 passes on)."""
    if len(arguments) < 2:
        parser.error("as a mount helper vcfs takes URL MOUNTPOINT [-o OPTIONS]")
    url, mountpoint, *rest = arguments
    if len(rest) % 2 or any(flag != "-o" for flag in rest[::2]):
        parser.error(f"as a mount helper vcfs takes URL MOUNTPOINT [-o OPTIONS], not "
                     f"{' '.join(rest)!r}")
    ours = _mount_long_options(parser)
    result, fuse_options = ["mount", url, mountpoint, "--daemon"], []
    for option in (o for group in rest[1::2] for o in group.split(",") if o):
        key, has_value, value = option.partition("=")
        if key in _FSTAB_KEYWORDS or key.startswith("x-") or key == "comment":
            continue
        flag = "--" + key.replace("_", "-")
        if flag in ours:
            result.append(f"{flag}={value}" if has_value else flag)
        else:
            fuse_options.append(option)
    if fuse_options:
        result += ["-o", ",".join(fuse_options)]
    return result


def _mount_long_options(parser: argparse.ArgumentParser) -> set[str]:
    """The `mount` command's --options an fstab line may give (not --help, nor --daemon and
    --foreground: a mount helper detaches; nor the internal ones)."""
    mount = next(action.choices["mount"] for action in parser._actions
                 if isinstance(action.choices, dict) and "mount" in action.choices)
    return {name for action in mount._actions
            if action.dest not in ("help", "daemon") and action.help != argparse.SUPPRESS
            for name in action.option_strings if name.startswith("--")}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    arguments = sys.argv[1:] if argv is None else list(argv)
    helper = bool(arguments) and "://" in arguments[0]  # no command, a URL: mount(8)'s call
    if helper:
        arguments = mount_helper_arguments(arguments, parser)
    args = parser.parse_args(arguments)
    try:
        if args.command == "unmount":
            return unmount(os.path.realpath(args.mountpoint), lazy=args.lazy)
        if args.status_fd is not None:  # the --daemon child; its children do not inherit the URL
            args.url = os.environ.pop(_DAEMON_URL, args.url)
        options = mount_options(args)
        if args.daemon:
            # mount(8)'s helpers say nothing once mounted, as mount(8) itself.
            return run_daemon(options, announce=not helper)
        return run_mount(options, status_fd=args.status_fd)
    except (StartupError, NoThread) as exc:  # NoThread: e.g. for the first request, under a limit
        print(f"vcfs: error: {exc}", file=sys.stderr)
        # From the command line: the options may be what failed.
        fd = fuse_fd(args.mountpoint) if args.command == "mount" else None
        if fd is not None and is_fuse_device(fd):
            print(f"vcfs: the mount made for {args.mountpoint} is left dead (\"Transport "
                  "endpoint is not connected\"), and vcfs cannot unmount it: umount its mount "
                  "point", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the mount was up (then Ctrl-C unmounts, exit 0)
        print("vcfs: interrupted, nothing mounted", file=sys.stderr)
        return 130


def _check_thread_options(fuse_options: tuple[str, ...]) -> None:
    """libfuse's thread-pool words, checked here rather than by libfuse after the service was
    asked: a number each, and max_threads no fewer than vcfs's own (vcfs/limits.py): with
    fewer, reads stalled on the service take every thread and hold up the rest of the mount,
    cached bytes, listings and stats too, until they time out."""
    for option in fuse_options:
        key, _, value = option.partition("=")
        if key not in ("max_threads", "max_idle_threads"):
            continue
        if not is_decimal(value):
            raise StartupError(f"-o {option}: {key} takes a whole number of threads")
        if key == "max_threads" and int(value) < FUSE_THREADS:
            raise StartupError(
                f"-o {option}: vcfs needs at least {FUSE_THREADS} FUSE threads ({READS_WAITING} "
                "reads may wait on the service at once, and the rest answer lookups, listings "
                "and reads of cached bytes meanwhile); more are allowed")


def mount_options(args: argparse.Namespace) -> MountOptions:
    block, cache = args.block_size, args.cache_size
    window = min(_READAHEAD_MAX, cache // 2) if args.readahead_max is None else args.readahead_max
    if block < 4 * KIB or block % (4 * KIB) or block > 64 * MIB:
        raise StartupError(f"--block-size must be a multiple of 4K between 4K and 64M, not {block}")
    if cache < 2 * block:
        raise StartupError(f"--cache-size ({cache}) must hold at least two blocks ({2 * block})")
    if window > cache // 2:
        raise StartupError(
            f"--readahead-max ({window}) must be at most half of --cache-size ({cache}), or "
            "prefetched blocks would be evicted before they are read"
        )
    if args.keep_passed is not None and args.keep_passed > cache:
        raise StartupError(
            f"--keep-passed ({args.keep_passed}) must be at most --cache-size ({cache})")
    fuse_stack = fuse_thread_stack(os.environ.get(_FUSE_THREAD_STACK))
    # A cache that cannot fit fills until the OOM killer ends the daemon (a dead mount), or
    # reads fail with EIO (vcfs.memory).
    facts = current_limits()
    found = limits(facts, fuse_stack=fuse_stack, block_size=block)
    if refusal := cache_refusal(cache, found):
        raise StartupError(refusal)
    fuse_options = tuple(o for group in args.fuse_options for o in group.split(",") if o)
    if "rw" in fuse_options:
        raise StartupError("vcfs is read-only: -o rw is not possible")
    keywords = {option.partition("=")[0] for option in fuse_options}
    if "subtype" in keywords:
        raise StartupError(f"-o subtype: a vcfs mount is of type {_FSTYPE} "
                           "(vcfs unmount unmounts nothing else)")
    max_read(fuse_options)  # a malformed one stops here, not in libfuse
    not_mount_options = _HELPER_KEYWORDS & keywords
    if not_mount_options:
        raise StartupError(f"-o {','.join(sorted(not_mount_options))}: not a mount option "
                           "(vcfs runs in the foreground or --daemon, multithreaded)")
    if refused := sorted(_NOT_MOUNT_OPTIONS.keys() & keywords):
        raise StartupError(f"-o {refused[0]}: not a mount option "
                           f"({_NOT_MOUNT_OPTIONS[refused[0]]})")
    if {"allow_other", "allow_root"} <= keywords:
        # libfuse 3 mounts the pair as allow_root: the kernel lets everyone in, then libfuse
        # answers users other than the owner and root "Permission denied" (libfuse 2 refused it).
        raise StartupError("-o allow_other,allow_root: one or the other (with both, libfuse "
                           "lets in only the owner and root, as allow_root): allow_other for "
                           "every user, allow_root for the owner and root")
    _check_thread_options(fuse_options)
    token_file = os.path.abspath(args.token_file) if args.token_file else None
    fd = fuse_fd(args.mountpoint)
    return MountOptions(
        url=args.url,
        # Symlinks resolved: the mount is made on the target, and a symlink is never a
        # mount point (vcfs would wait for one; fusermount3 -u refuses it). Not /dev/fd/N: it
        # is a link to /dev/fuse.
        mountpoint=args.mountpoint if fd is not None else os.path.realpath(args.mountpoint),
        fuse_fd=fd,
        cache_size=cache,
        block_size=block,
        fuse_stack=fuse_stack,
        readahead_max=window,
        timeout=args.timeout,
        fuse_options=fuse_options,
        log_level=args.log_level,
        log_file=os.path.abspath(args.log_file) if args.log_file else None,
        raise_readahead=args.raise_readahead,
        memory_warnings=tuple(cache_warnings(cache, facts, found)),
        first_block_with_meta=(args.first_block_with_meta and block % _DIGEST_CHUNK == 0
                               and block <= _FIRST_BLOCK_MAX),
        keep_passed=args.keep_passed,
        token_file=token_file,
        token=_token(token_file) if token_file else None,
    )


def fuse_thread_stack(given: str | None) -> int:
    """The stack of libfuse's threads: vcfs's own (THREAD_STACK), or more if the environment's
    FUSE_THREAD_STACK (`given`) asks for more. Less is refused: a thread that overflows its stack
    kills the daemon (a dead mount); and so is what libfuse's atoi cannot read, which it would
    report as "invalid stack size" and replace with `ulimit -s`."""
    if given is None:
        return THREAD_STACK
    if not is_decimal(given) or not THREAD_STACK <= int(given) < 1 << 31:
        raise StartupError(
            f"{_FUSE_THREAD_STACK}={given!r} in the environment: libfuse's thread stack must be "
            f"a number of bytes from {THREAD_STACK} (2 MiB, what vcfs sets when the variable is "
            f"unset) to {(1 << 31) - 1}; unset it, or give more")
    return int(given)


def set_thread_stacks(fuse_stack: int) -> None:
    """Give every thread vcfs starts from now on a stack of THREAD_STACK, and libfuse's threads
    one of `fuse_stack`, instead of `ulimit -s` each (vcfs.limits). Before any thread starts:
    threading reads its size as it starts one, libfuse its variable as it starts one."""
    threading.stack_size(THREAD_STACK)
    os.environ[_FUSE_THREAD_STACK] = str(fuse_stack)


def _token(path: str) -> str:
    try:
        return read_token_file(path, label="--token-file")
    except TokenFileError as exc:
        raise StartupError(str(exc)) from exc


# ---------------------------------------------------------------------------------------------
# Pre-flight checks


def fuse_fd(mountpoint: str) -> int | None:
    """N of a /dev/fd/N mount point (see _FUSE_FD), else None."""
    match = _FUSE_FD.fullmatch(mountpoint)
    return int(match.group(1)) if match else None


def check_fuse_available() -> None:
    try:
        mode = os.stat("/dev/fuse").st_mode
    except OSError as exc:
        raise StartupError(
            f"/dev/fuse is not available ({exc.strerror}): load the fuse module "
            "(modprobe fuse) or give the container the device (--device /dev/fuse)"
        ) from exc
    if not stat.S_ISCHR(mode):
        raise StartupError("/dev/fuse is not a character device")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        # libfuse opens it as the user (so does fusermount3): without access the mount fails
        # with a bare "Permission denied" from libfuse.
        raise StartupError(
            f"/dev/fuse is not readable and writable by this user (uid {os.getuid()}; mode "
            f"{stat.S_IMODE(mode):04o}), which a mount by a user other than root needs: udev "
            "normally makes it 0666; as root, chmod 0666 /dev/fuse (or run vcfs as root)"
        )
    if shutil.which("fusermount3") is None:
        raise StartupError("fusermount3 not found on PATH: install the fuse3 package")
    try:
        from vcfs import fuselib
    except OSError as exc:
        raise StartupError(f"libfuse3 cannot be loaded ({exc}): install the fuse3 package") from exc
    if fuselib.fuse_version_major != 3:
        log.warning("running on libfuse%d: reads are capped at 128 KiB", fuselib.fuse_version_major)


def check_allow_other(fuse_options: Sequence[str]) -> None:
    """fusermount3's rule for users other than root, which it reports after libfuse started,
    on two lines: allow_other (or allow_root) only with user_allow_other in /etc/fuse.conf."""
    asked = {"allow_other", "allow_root"} & {o.partition("=")[0] for o in fuse_options}
    if os.getuid() == 0 or not asked:
        return
    try:
        with open(_FUSE_CONF, encoding="utf-8", errors="replace") as conf:
            # As fusermount3 reads it: a line of its own, comments and blanks stripped, ended
            # by a newline (it skips a last line without one, "missing newline at end of file").
            if any(line.endswith("\n") and line.partition("#")[0].strip() == "user_allow_other"
                   for line in conf):
                return
    except FileNotFoundError:
        pass
    except OSError:
        return  # fusermount3, setuid root, may read what this user cannot: it decides
    option = min(asked)
    raise StartupError(f"-o {option}: a user other than root (uid {os.getuid()}) needs "
                       f"user_allow_other in {_FUSE_CONF}, which fusermount3 requires: as root, "
                       f"add that line, or mount without {option} (the mount is then yours alone)")


def is_fuse_device(fd: int) -> bool:
    try:
        status = os.fstat(fd)
    except OSError:
        return False
    return stat.S_ISCHR(status.st_mode) and status.st_rdev == _FUSE_DEVICE


def check_fuse_fd(mountpoint: str, fd: int) -> None:
    """A /dev/fd/N mount point (mount.fuse3 -o drop_privileges): the mount is made, by a
    process with the privileges vcfs may not have (nor /dev/fuse access, nor fusermount3); N
    must be an open /dev/fuse, and libfuse must know the form (3.3 and later)."""
    if not is_fuse_device(fd):
        raise StartupError(f"mount point {mountpoint}: descriptor {fd} is not an open /dev/fuse: "
                           "/dev/fd/N is for the /dev/fuse descriptor of a mount made for vcfs, "
                           "as mount.fuse3 -o drop_privileges passes")
    try:
        from vcfs import fuselib
    except OSError as exc:
        raise StartupError(f"libfuse3 cannot be loaded ({exc}): install the fuse3 package") from exc
    version = (fuselib.fuse_version_major, fuselib.fuse_version_minor)
    if version < (3, 3):
        raise StartupError(f"mount point {mountpoint}: libfuse {version[0]}.{version[1]} cannot "
                           "serve a /dev/fd/N mount point (libfuse 3.3 and later can)")


def prepare_mountpoint(mountpoint: str) -> None:
    """Clear a stale vcfs mount, then insist on an existing, empty, unmounted directory."""
    if is_stale_mount(mountpoint):
        entry = mount_entry(mountpoint)
        if entry is not None and not is_vcfs_type(entry[0]):
            # Another file system's dead mount is not vcfs's to unmount (as root, fusermount3
            # unmounts any type, a network file system that says ENOTCONN while it reconnects
            # included).
            raise StartupError(f"{mountpoint} is already a mount point ({entry[0]}, whose "
                               "daemon died: not vcfs's to unmount; choose an empty directory "
                               "that is not a mount point)")
        clear_stale_mount(mountpoint)
    try:
        os.stat(mountpoint)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise StartupError(f"mount point {mountpoint} does not exist") from exc
        raise StartupError(f"mount point {mountpoint}: {exc.strerror}") from exc
    if not os.path.isdir(mountpoint):
        raise StartupError(f"mount point {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        entry = mount_entry(mountpoint)
        if entry is not None and is_vcfs_type(entry[0]):
            advice = f"a vcfs mount: vcfs unmount {mountpoint} to free it"
        else:  # not vcfs's to unmount: vcfs unmount refuses it
            advice = (f"{entry[0] if entry else 'another file system'}: choose an empty "
                      "directory that is not a mount point")
        raise StartupError(f"{mountpoint} is already a mount point ({advice})")
    if os.geteuid() != 0 and not os.access(mountpoint, os.W_OK):
        # fusermount3's own rule, which it reports after libfuse's start, on two lines.
        raise StartupError(f"mount point {mountpoint} is not writable by this user (uid "
                           f"{os.getuid()}), which fusermount3 requires: use a directory of "
                           "your own")
    try:
        if os.listdir(mountpoint):
            raise StartupError(f"mount point {mountpoint} is not empty")
    except OSError as exc:
        raise StartupError(f"mount point {mountpoint}: {exc.strerror}") from exc


def is_stale_mount(mountpoint: str) -> bool:
    """Whether a dead FUSE daemon's mount sits here ("Transport endpoint is not connected").

    statfs always reaches the daemon; stat may not, the kernel caches the root's attributes.
    """
    try:
        os.statvfs(mountpoint)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def mount_entry(mountpoint: str) -> tuple[str, int | None] | None:
    """The file system type of the mount at `mountpoint` (the topmost) and, for FUSE, the uid
    that mounted it, from mountinfo; None if nothing is mounted there. (Not os.path.ismount:
    it stats the mount's root, which another user's FUSE mount refuses: "not mounted".)"""
    target = os.path.realpath(mountpoint)
    entry = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as info:
        for mount in mountinfo.mounts(info.read()):
            if mount.mount_point == target:
                owner = re.search(r"(?:^|,)user_id=(\d+)", mount.super_options)
                entry = mount.fstype, int(owner.group(1)) if owner else None
    return entry


def is_vcfs_type(fstype: str) -> bool:
    """Whether a mount of type `fstype` is vcfs's: fuse.vcfs, the type vcfs mounts with (and
    mount.fuse3 with drop_privileges for a fuse.vcfs line); or fuse./path/to/vcfs, which
    mount.fuse3 gives the mount it makes with drop_privileges in the `fuse` /
    `/path/to/vcfs#URL` form: the subtype is the program it runs, named vcfs. The last part
    of that path, not any: fuse./opt/vcfs/bin/sshfs is sshfs's. (The source field is no
    better: it is the subtype again, or whatever fsname= the line gives.)"""
    kind, _, program = fstype.partition(".")
    return kind == "fuse" and program.rpartition("/")[2] == _FSTYPE.removeprefix("fuse.")


def clear_stale_mount(mountpoint: str) -> None:
    """Unmount what a crashed FUSE daemon left behind; lazily if a process still holds it."""
    log.warning("%s is a stale mount (its daemon died); unmounting it", mountpoint)
    for flags in ("-u", "-uz"):
        result = subprocess.run(
            ["fusermount3", flags, mountpoint], capture_output=True, text=True, check=False
        )
        if result.returncode == 0:
            return
        log.warning("fusermount3 %s %s: %s", flags, mountpoint, result.stderr.strip())
    raise StartupError(f"cannot clear the stale mount at {mountpoint}; try: umount -l {mountpoint}")


# ---------------------------------------------------------------------------------------------
# Mounting


class _LogFile(logging.handlers.WatchedFileHandler):
    """The log file, followed to a new file at its path at the next line once it is renamed
    or removed (logrotate), and with it a daemon's stdout and stderr (libfuse's messages, a
    traceback), which are the log's too (`_detach_stdio`). A mount runs for weeks: it wrote
    on into the rotated file, deleted in the end, whose disk space it held until unmounted."""

    def _open(self) -> io.TextIOWrapper:
        stream = super()._open()
        replaced = getattr(self, "dev", -1), getattr(self, "ino", -1)  # none at the first
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                held = os.fstat(fd)
                if (held.st_dev, held.st_ino) == replaced:
                    os.dup2(stream.fileno(), fd)
        return stream


def configure_logging(level: str, log_file: str | None) -> None:
    handler: logging.Handler = (
        _LogFile(log_file) if log_file else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # mfusepy logs every errno with a traceback at debug level: noise, even when debugging.
    logging.getLogger("fuse").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def run_mount(options: MountOptions, *, status_fd: int | None = None) -> int:
    """Mount and serve until unmounted or signalled (SIGINT/SIGTERM/SIGHUP unmount)."""
    set_thread_stacks(options.fuse_stack)
    try:
        configure_logging(options.log_level, options.log_file)
    except OSError as exc:
        raise StartupError(f"cannot open the log file: {exc}") from exc
    if options.fuse_fd is None:
        check_fuse_available()
        check_allow_other(options.fuse_options)
        prepare_mountpoint(options.mountpoint)
    else:
        check_fuse_fd(options.mountpoint, options.fuse_fd)
    for warning in options.memory_warnings:
        log.warning("%s", warning)
    tune_malloc(arenas=_MALLOC_ARENAS, block_size=options.block_size)
    config = RemoteConfig(
        timeout=options.timeout, first_block_with_meta=options.first_block_with_meta
    )
    remote = Remote.connect(options.url, config=config, token=options.token)
    try:
        try:
            remote.check_health()
        except (RemoteUnavailable, AccessDenied) as exc:
            raise StartupError(
                f"cannot reach the vidcache service at {without_credentials(options.url)}: "
                f"{exc}"
            ) from exc
        try:
            remote.check_access()
        except AccessDenied as exc:
            raise StartupError(f"the vidcache service at {without_credentials(options.url)} "
                               f"refused access to {exc}") from exc
        return _serve(options, remote, status_fd)
    finally:
        remote.close()


def max_read(fuse_options: Sequence[str]) -> int | None:
    """The bytes of `-o max_read=N` (the last one), None without it."""
    values = [value for key, _, value in (o.partition("=") for o in fuse_options)
              if key == "max_read"]
    if not values:
        return None
    if not is_decimal(values[-1]) or int(values[-1]) == 0:
        raise StartupError(f"-o max_read: a number of bytes above 0, not {values[-1]!r}")
    return int(values[-1])


def tune_malloc(*, arenas: int, block_size: int) -> None:
    """Set glibc's malloc up for the block cache, before the threads start. A no-op where the
    C library has no mallopt (not glibc).

    - At most `arenas` arenas: glibc gives threads that contend for malloc arenas of their own
      (up to 8 per core); a 1 MiB block freed into one arena is not reused by a thread
      allocating from another, so with dozens of FUSE threads, the HTTP workers and the readahead
      threads the heap grows tens of MB past the cache budget.
    - Blocks come from the heap, and freed ones stay there for the next block: by default
      glibc maps a large allocation of its own until its adaptive threshold has grown past
      it, and gives free memory at the top of the heap back to the OS, so a recycled block
      (evicted, or dropped behind a stream) would be faulted in again page by page
      (~2.7 us per 4 KiB page on the 2-core benchmark VM, ~0.7 ms per MiB). Setting the
      thresholds also turns the adaptation off. Same trick as the service's
      `vidcache.serving.keep_buffers_in_heap`.
    """
    mmap_threshold = min(max(2 * block_size, 4 * MIB), _MAX_MMAP_THRESHOLD)
    set_malloc_options({"M_ARENA_MAX": arenas, "M_MMAP_THRESHOLD": mmap_threshold,
                        "M_TRIM_THRESHOLD": _TRIM_THRESHOLD})


def libfuse_thread_options(version: tuple[int, int]) -> dict[str, str | bool]:
    """libfuse 3's thread pool options for vcfs: it starts threads as requests wait for one, up
    to `max_threads` (3.12 and later, which also warn when it is left out), and keeps the idle
    ones (not ended and started again under load). Before 3.12, libfuse refuses to mount with
    an option it does not know (`unknown option(s): -o max_threads=64`)."""
    if version >= (3, 12):
        return {"max_threads": str(FUSE_THREADS), "max_idle_threads": str(FUSE_THREADS)}
    return {"max_idle_threads": str(FUSE_THREADS)}


def _serve(options: MountOptions, remote: Remote, status_fd: int | None) -> int:
    # Imported here: loading libfuse must not be needed for --help (see check_fuse_available).
    from vcfs.fs import FsConfig, VcfsOperations
    from vcfs.fuselib import FUSE, fuse_version_major, fuse_version_minor, libfuse_thread_refusals

    cache = BlockCache(
        remote.fetch,
        block_size=options.block_size,
        capacity=options.cache_size,
        block_fetcher=remote.fetch_blocks,
        passed_capacity=options.keep_passed,
    )
    mounted = threading.Event()

    def on_mounted() -> None:
        mounted.set()
        if status_fd is not None:
            _detach_stdio(options.log_file)
            os.write(status_fd, b"ok\n")
            os.close(status_fd)

    config = FsConfig(
        readahead_max=options.readahead_max,
        kernel_readahead_kb=1024 if options.raise_readahead else None,
        max_read=max_read(options.fuse_options),
    )
    premounted = options.fuse_fd is not None
    # For a /dev/fd/N mount point, libfuse leaves the mount options, and the unmount, alone:
    # they are its opener's.
    where = f"the mount made on {options.mountpoint}" if premounted else options.mountpoint
    operations = VcfsOperations(remote, cache, mountpoint=options.mountpoint, config=config,
                                on_mounted=on_mounted, premounted=premounted)
    fuse_kwargs: dict[str, str | bool] = {
        "ro": True, "fsname": "vcfs", "subtype": _FSTYPE.removeprefix("fuse."),
        "default_permissions": True,
        **(libfuse_thread_options((fuse_version_major, fuse_version_minor))
           if fuse_version_major >= 3 else operations.libfuse2_options()),
    }
    for option in options.fuse_options:  # the user's -o options (fsname=..., allow_other)
        key, has_value, value = option.partition("=")
        fuse_kwargs[key] = value if has_value else True
    # In MiB at most, as this line has always shown them (`cache 1024 MiB`).
    readahead = (f"readahead up to {size_text(options.readahead_max, largest=MIB)}"
                 if options.readahead_max else "no readahead")
    log.info(
        "mounting %s at %s (cache %s in %s blocks, %s)",
        without_credentials(options.url), where, size_text(options.cache_size, largest=MIB),
        size_text(options.block_size, largest=MIB), readahead,
    )
    if os.geteuid() == 0 and "allow_other" not in fuse_kwargs:
        # Other users get "Permission denied" from the kernel, which vcfs never sees.
        log.info("only root can read %s: for other users' players (VLC refuses to run as "
                 "root), mount with -o allow_other", where)
    signalled = False
    try:
        operations.start_lifecycle()
        with libfuse_thread_refusals(operations.libfuse_thread_refused):
            FUSE(operations, options.mountpoint, raw_fi=True, foreground=True, **fuse_kwargs)
    except NoThread as exc:  # from start_lifecycle: nothing is mounted yet
        raise StartupError(f"mounting at {where} failed: {exc}") from exc
    except RuntimeError as exc:
        # libfuse also reports an exit by signal as a non-zero code; only a mount that never
        # came up is a failure.
        if not mounted.is_set():
            raise StartupError(
                f"mounting at {where} failed (libfuse code {exc}; see above)"
            ) from exc
        signalled = True
    finally:
        operations.close()
        if mounted.is_set():
            counters = json.dumps(operations.stats(), sort_keys=True)
            if premounted and signalled:
                log.warning("stopped by a signal: %s stays, dead (\"Transport endpoint is not "
                            "connected\"), until its mount point is unmounted (umount), which "
                            "vcfs cannot do; counters: %s", where, counters)
            else:
                log.info("unmounted %s; counters: %s", where, counters)
    return 0


def _detach_stdio(log_file: str | None) -> None:
    """A daemon's stdout/stderr go to its log file, or nowhere (libfuse writes to stderr)."""
    target = os.open(log_file or os.devnull, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(target, 1)
    os.dup2(target, 2)
    os.close(target)


def foreground_arguments(options: MountOptions) -> list[str]:
    """The `vcfs mount ... --foreground` arguments that give the daemon `options` again
    (tests check every option survives the trip), the URL without its credentials (the
    daemon's environment has it whole)."""
    argv = [
        "mount", without_credentials(options.url), options.mountpoint,
        "--cache-size", str(options.cache_size), "--block-size", str(options.block_size),
        "--readahead-max", str(options.readahead_max), "--timeout", str(options.timeout),
        "--log-level", options.log_level, "--foreground",
    ]
    for option in options.fuse_options:
        argv += ["-o", option]
    if options.log_file:
        argv += ["--log-file", options.log_file]
    if options.token_file:
        argv += ["--token-file", options.token_file]
    if not options.raise_readahead:
        argv.append("--no-raise-readahead")
    if not options.first_block_with_meta:
        argv.append("--no-first-block")
    if options.keep_passed is not None:
        argv += ["--keep-passed", str(options.keep_passed)]
    return argv


def run_daemon(options: MountOptions, *, announce: bool = True) -> int:
    """Start `vcfs mount --foreground` detached; return once it mounted (0), saying so on
    stdout if `announce`, or failed."""
    argv = [sys.executable, "-m", "vcfs", *foreground_arguments(options)]
    fd = options.fuse_fd
    if fd is not None:  # passed on: the child could not start without it open
        check_fuse_fd(options.mountpoint, fd)
    wait = options.timeout + _DAEMON_START_MARGIN
    read_end, write_end = os.pipe()
    with tempfile.TemporaryFile(prefix="vcfs-start-") as early_output:
        try:
            child = subprocess.Popen(
                [*argv, "--status-fd", str(write_end)],
                stdin=subprocess.DEVNULL,
                stdout=early_output,
                stderr=early_output,
                pass_fds=(write_end,) if fd is None else (write_end, fd),
                env={**os.environ, _DAEMON_URL: options.url},
                start_new_session=True,
                cwd="/",
            )
        except OSError as exc:
            os.close(read_end)
            raise StartupError(f"cannot start the daemon ({argv[0]}): {exc}") from exc
        finally:
            os.close(write_end)
        try:
            status = _read_status(read_end, wait)
        except KeyboardInterrupt:
            # The child, in a session of its own, did not get the Ctrl-C: it must not mount
            # after the user gave up on it.
            _stop(child)
            raise
        finally:
            os.close(read_end)
        if status == b"ok\n":
            if announce:
                print(f"vcfs: mounted {without_credentials(options.url)} at "
                      f"{options.mountpoint} (pid {child.pid})")
            if not options.log_file:
                early_output.seek(0)
                sys.stderr.write(_warnings(early_output.read().decode(errors="replace")))
            return 0
        code = _stop(child)
        early_output.seek(0)
        sys.stderr.write(early_output.read().decode(errors="replace"))
        if status:
            raise StartupError(f"the mount did not come up within {wait:g} s")
        if code < 0:  # killed (the OOM killer, a crash): it said nothing, and -9 is no status
            raise StartupError(f"the daemon (pid {child.pid}) was killed by "
                               f"{signal_name(-code)} before the mount came up")
        return code or 1


# A line `configure_logging` writes at WARNING or above.
_WARNING_LINE = re.compile(r"^\d{4}-\d\d-\d\d \S+ (?:WARNING|ERROR|CRITICAL) ")


def _warnings(early_output: str) -> str:
    """The warnings a daemon without --log-file logged before it mounted (a server taken for a
    vidcache 1.x, ...): said on the terminal, as no log keeps them."""
    return "".join(line for line in early_output.splitlines(keepends=True)
                   if _WARNING_LINE.match(line))


def _stop(child: subprocess.Popen[bytes]) -> int:
    """SIGTERM (a mount that came up meanwhile unmounts), SIGKILL if it lingers; its code."""
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
    try:
        return child.wait(timeout=10)
    except subprocess.TimeoutExpired:
        child.kill()
        return child.wait()


def _read_status(fd: int, timeout: float) -> bytes:
    """Read the child's status line: b"ok\\n"; b"" if it exited first, b"timeout" if no whole
    line came within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    received = b""
    while not received.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return b"timeout"
        chunk = os.read(fd, 64)
        if not chunk:
            return b""
        received += chunk
    return received


# ---------------------------------------------------------------------------------------------
# Unmounting


def unmount(mountpoint: str, *, lazy: bool = False) -> int:
    """Unmount a vcfs mount, or clear the stale mount of a vcfs that died. Any other file
    system is refused, dead or not: as root, fusermount3 unmounts whatever is there (a tmpfs,
    and the files in it, included)."""
    stale = is_stale_mount(mountpoint)
    entry = mount_entry(mountpoint)
    if entry is None and not stale:
        missing = "" if os.path.lexists(mountpoint) else " (it does not exist: a typo?)"
        raise StartupError(f"{mountpoint} is not mounted{missing}")
    if entry is not None:
        fstype, owner = entry
        if not is_vcfs_type(fstype):
            raise StartupError(f"{mountpoint} is a {fstype} mount, not a vcfs one; not unmounting "
                               f"it (umount, or fusermount3 -u for another FUSE file system)")
        if not stale and owner is not None and os.geteuid() not in (0, owner):
            # fusermount3 would only say "entry for ... not found in /etc/mtab".
            raise StartupError(f"{mountpoint} was mounted by uid {owner}: only that user or "
                               "root can unmount it")
    result = subprocess.run(
        ["fusermount3", "-uz" if lazy else "-u", mountpoint],
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        message = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
        hint = " (files still open? use --lazy)" if "busy" in message else ""
        raise StartupError(f"cannot unmount {mountpoint}: {message}{hint}")
    return 0
