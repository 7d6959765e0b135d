"""How many reads vcfs lets wait on the service at once, the pools sized from it, and the
stack of each of their threads.

The kernel lets `READS_WAITING` reads wait on vcfs at once, each on a FUSE thread; spare FUSE
threads serve lookups, opens and listings meanwhile. Any FUSE thread may be waiting on the
service, so the block cache's fetch threads and the HTTP workers (one connection each) are as
many as the FUSE threads: a read's fetch or a lookup's request never queues behind stalled
ones (docs/vcfs.md, "Reads stalled on the service hold up nothing else"; docs/benchmarks-history.md,
the twelfth round, measured what they cost: nothing beyond the runs' noise).
"""

# The kernel's default (12) is all it takes for reads stalled on the service to hold up every
# read of the mount, cached bytes' too.
READS_WAITING = 48
# One per waiting read, and more: lookups, opens and listings still find one.
FUSE_THREADS = READS_WAITING + 16
# The stack of each of vcfs's threads, FUSE threads included (vcfs.cli.set_thread_stacks),
# instead of glibc's default, `ulimit -s` (8 MiB by default): the 200 or so threads of a busy
# mount would take 1.6 GiB of address space, counted in `ulimit -d` and `ulimit -v`. Measured
# under 60 concurrent readers, over http and https, the service up or down (debug logging,
# BLAKE3, TLS handshakes, ctypes callbacks): no thread used more than 24 KiB of its stack. And
# even a runaway recursion stops with Python's RecursionError (its limit is 1000 calls) before
# 2 MiB: the deepest found, through a C builtin calling back into Python (sorted's key), took
# 1.6 MiB; 1 MiB would have been a crash.
THREAD_STACK = 2 << 20
