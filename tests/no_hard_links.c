/* A file system without hard links, for tests/test_service_cli_reads.py: an LD_PRELOAD library
 * failing link() and linkat() with the errno VIDCACHE_LINK_ERRNO names, as FAT and exFAT fail
 * them (EPERM), a CIFS share without them (EOPNOTSUPP), and a FUSE file system that has no
 * link operation (ENOSYS, as older kernels pass it on; newer ones turn it into EPERM). */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

static int refused(void) {
    const char *number = getenv("VIDCACHE_LINK_ERRNO");
    errno = number == NULL ? EPERM : atoi(number);
    return -1;
}

int link(const char *from, const char *to) {
    (void)from, (void)to;
    return refused();
}

int linkat(int from_dir, const char *from, int to_dir, const char *to, int flags) {
    (void)from_dir, (void)from, (void)to_dir, (void)to, (void)flags;
    return refused();
}
