"""glibc heap settings for XLA:CPU's large per-step buffers (no-ops where libc is not glibc).

Shared by the experiment runners: each config's `reuse_freed_memory` decides whether
`keep_freed_memory` is called at start-up, and `release_freed_memory` runs between runs."""

import ctypes


def keep_freed_memory() -> None:
    """Ask glibc to reuse freed memory instead of unmapping it (a no-op elsewhere).

    XLA:CPU allocates a step's temporaries (for SmolLM2 about 0.6 GB of gradients) on every
    call. By default glibc serves blocks that large with fresh mmaps and unmaps them when freed,
    so each step page-faults them in again: 160k faults and about a fifth of the step's CPU time
    (measured). Without mmap, with one arena and no trimming, the memory is reused. Call it
    before JAX starts its threads, so that they share the one arena.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # from glibc's malloc.h
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)
    libc.mallopt(m_arena_max, 1)


def release_freed_memory() -> None:
    """Hand the memory freed so far back to the OS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
