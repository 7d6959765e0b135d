/* A disk slow to answer under vidcache's blobs, for tests/test_service_serving.py: an
 * LD_PRELOAD library over preadv2 (the call os.preadv makes). While the file
 * $VIDCACHE_STALL_DIR/gate exists, the bytes of a file whose path ends in
 * $VIDCACHE_STALL_SUFFIX are never in the page cache (a read with RWF_NOWAIT fails with EAGAIN)
 * and a read that waits for the disk waits until the gate is removed; meanwhile the file
 * $VIDCACHE_STALL_DIR/stalled-TID says that thread TID is waiting.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

typedef ssize_t (*preadv2_fn)(int, const struct iovec *, int, off_t, int);

/* Whether reads of fd stall now: the gate is there and fd is open on a stalled file. */
static int stalls(int fd, char *gate, size_t gate_size) {
    const char *dir = getenv("VIDCACHE_STALL_DIR"), *suffix = getenv("VIDCACHE_STALL_SUFFIX");
    char link[64], target[4096];
    if (dir == NULL || suffix == NULL)
        return 0;
    snprintf(gate, gate_size, "%s/gate", dir);
    if (access(gate, F_OK) != 0)
        return 0;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t length = readlink(link, target, sizeof target - 1);
    if (length < 0)
        return 0;
    target[length] = '\0';
    size_t suffix_length = strlen(suffix);
    return (size_t)length >= suffix_length
           && strcmp(target + length - suffix_length, suffix) == 0;
}

static ssize_t stalled_preadv2(const char *name, int fd, const struct iovec *iov, int count,
                               off_t offset, int flags) {
    preadv2_fn real = (preadv2_fn)dlsym(RTLD_NEXT, name);
    char gate[4096], marker[4096];
    if (stalls(fd, gate, sizeof gate)) {
        if (flags & RWF_NOWAIT) {
            errno = EAGAIN;
            return -1;
        }
        snprintf(marker, sizeof marker, "%s/stalled-%ld", getenv("VIDCACHE_STALL_DIR"),
                 (long)syscall(SYS_gettid));
        int made = open(marker, O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
        if (made >= 0)
            close(made);
        while (access(gate, F_OK) == 0)
            usleep(10000);
        unlink(marker);
    }
    return real(fd, iov, count, offset, flags);
}

ssize_t preadv2(int fd, const struct iovec *iov, int count, off_t offset, int flags) {
    return stalled_preadv2("preadv2", fd, iov, count, offset, flags);
}

ssize_t preadv64v2(int fd, const struct iovec *iov, int count, off_t offset, int flags) {
    return stalled_preadv2("preadv64v2", fd, iov, count, offset, flags);
}
