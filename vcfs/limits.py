"""How many reads vcfs lets wait on the service at once, and the pools sized from it.

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
