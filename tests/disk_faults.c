/* A disk failing under vidcache's index, for tests/test_service_disk.py: an LD_PRELOAD library
 * over the libc calls SQLite makes (libsqlite3 calls them through the dynamic linker), where no
 * device-mapper (dm-error, dm-flakey) is at hand. VIDCACHE_FAULT chooses the fault:
 *
 *   fsync  the first fdatasync or fsync of the index's -wal while it holds more than
 *          VIDCACHE_FAULT_BYTES bytes fails with EIO: a write-back error, reported once, as
 *          Linux reports one;
 *   read   once SQLite has opened a temporary file (etilqs_*: a VACUUM's copy, spilled out of
 *          its cache), every pread of the index at or past offset VIDCACHE_FAULT_BYTES fails
 *          with EIO: a sector gone bad;
 *   read-once  the first such pread only: a read that fails once (a cable, a controller
 *          reset), the disk sound after.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

static int synced_wrong, copying, read_wrong;

static int is_fault(const char *name) {
    const char *fault = getenv("VIDCACHE_FAULT");
    return fault != NULL && strcmp(fault, name) == 0;
}

static long long fault_bytes(void) {
    const char *bytes = getenv("VIDCACHE_FAULT_BYTES");
    return bytes == NULL ? 0 : atoll(bytes);
}

/* Whether the descriptor fd is open on a file whose path ends in suffix. */
static int opened_on(int fd, const char *suffix) {
    char link[64], target[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t length = readlink(link, target, sizeof target - 1);
    size_t wanted = strlen(suffix);
    if (length < 0 || (size_t)length < wanted)
        return 0;
    target[length] = '\0';
    return strcmp(target + length - wanted, suffix) == 0;
}

static int sync_fails(int fd) {
    struct stat status;
    if (synced_wrong || !is_fault("fsync") || !opened_on(fd, "/.vidcache/index.sqlite3-wal")
        || fstat(fd, &status) != 0 || status.st_size <= fault_bytes())
        return 0;
    synced_wrong = 1;
    errno = EIO;
    return 1;
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (real == NULL)
        real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    return sync_fails(fd) ? -1 : real(fd);
}

int fsync(int fd) {
    static int (*real)(int);
    if (real == NULL)
        real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    return sync_fails(fd) ? -1 : real(fd);
}

int open64(const char *path, int flags, ...) {
    static int (*real)(const char *, int, ...);
    if (real == NULL)
        real = (int (*)(const char *, int, ...))dlsym(RTLD_NEXT, "open64");
    mode_t mode = 0;
    if ((flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE) {  /* O_TMPFILE holds O_DIRECTORY */
        va_list arguments;
        va_start(arguments, flags);
        mode = va_arg(arguments, int);
        va_end(arguments);
    }
    if (strstr(path, "/etilqs_") != NULL)
        copying = 1;
    return real(path, flags, mode);
}

ssize_t pread64(int fd, void *buffer, size_t count, off_t offset) {
    static ssize_t (*real)(int, void *, size_t, off_t);
    if (real == NULL)
        real = (ssize_t (*)(int, void *, size_t, off_t))dlsym(RTLD_NEXT, "pread64");
    if (copying && (is_fault("read") || (is_fault("read-once") && !read_wrong))
        && offset >= fault_bytes() && opened_on(fd, "/.vidcache/index.sqlite3")) {
        read_wrong = 1;
        errno = EIO;
        return -1;
    }
    return real(fd, buffer, count, offset);
}
