"""glibc malloc options, for the vidcache service and the vcfs daemon (each picks its values).

Here because both depend on this package and vcfs must not import the service. Private: not
part of the client's API.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Mapping

log = logging.getLogger(__name__)

# glibc's mallopt() parameter numbers (malloc.h).
_PARAMETERS = {"M_TRIM_THRESHOLD": -1, "M_MMAP_THRESHOLD": -3, "M_ARENA_MAX": -8}


def set_malloc_options(options: Mapping[str, int]) -> bool:
    """Set each of `options` (a malloc.h name: M_TRIM_THRESHOLD, M_MMAP_THRESHOLD or
    M_ARENA_MAX, and its value) with glibc's mallopt(), in order; whether all were taken.
    A no-op where the C library has no mallopt (not glibc); an option glibc refuses is
    logged at debug level and the others are still set."""
    unknown = sorted(set(options) - set(_PARAMETERS))
    if unknown:
        raise ValueError(f"unknown malloc options {unknown}: expected some of "
                         f"{sorted(_PARAMETERS)}")
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    taken = True
    for name, value in options.items():
        if not mallopt(_PARAMETERS[name], value):
            log.debug("mallopt(%s, %d) refused", name, value)
            taken = False
    return taken
