/* Ctrl-C at the earliest moment after a download's temporary file exists, for
 * tests/test_service_cli_reads.py: an LD_PRELOAD library whose open() (and openat(), and their
 * 64-bit names) raises SIGINT in the calling process as soon as it has created a file whose
 * name ends in ".part", before returning. Python runs its handler, KeyboardInterrupt, at the
 * first point it checks for signals: right after the call that opened the file returns. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <string.h>

static int created_part(const char *path, int flags, int fd) {
    size_t length = strlen(path);
    if (fd >= 0 && (flags & O_CREAT) && length >= 5 && strcmp(path + length - 5, ".part") == 0)
        raise(SIGINT);
    return fd;
}

static mode_t mode_of(int flags, va_list modes) {
    return (flags & (O_CREAT | O_TMPFILE)) ? va_arg(modes, mode_t) : 0;
}

#define OPEN(name)                                                                  \
    int name(const char *path, int flags, ...) {                                    \
        static int (*real)(const char *, int, ...);                                 \
        va_list modes;                                                              \
        va_start(modes, flags);                                                     \
        mode_t mode = mode_of(flags, modes);                                        \
        va_end(modes);                                                              \
        if (real == NULL)                                                           \
            real = (int (*)(const char *, int, ...))dlsym(RTLD_NEXT, #name);        \
        return created_part(path, flags, real(path, flags, mode));                  \
    }

#define OPENAT(name)                                                                \
    int name(int dir, const char *path, int flags, ...) {                           \
        static int (*real)(int, const char *, int, ...);                            \
        va_list modes;                                                              \
        va_start(modes, flags);                                                     \
        mode_t mode = mode_of(flags, modes);                                        \
        va_end(modes);                                                              \
        if (real == NULL)                                                           \
            real = (int (*)(int, const char *, int, ...))dlsym(RTLD_NEXT, #name);   \
        return created_part(path, flags, real(dir, path, flags, mode));             \
    }

OPEN(open)
OPEN(open64)
OPENAT(openat)
OPENAT(openat64)
