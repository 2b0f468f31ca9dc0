"""How much host memory there is to spend: what decides between in-memory and bounded-memory paths."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["available_memory", "release_large_blocks"]


def available_memory() -> int:
    """Bytes the system can give without swapping (Linux MemAvailable; else free pages)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def release_large_blocks(threshold: int = 1 << 20) -> bool:
    """Have glibc serve blocks of `threshold` bytes and more with their own memory maps, so a freed
    tensor goes back to the system at once. By default glibc raises that threshold as large
    blocks are freed and then serves them from its heap, which it rarely shrinks: reading a model
    one layer at a time then leaves every layer's worth of freed memory resident (measured on a
    Llama-3.2-1B shape: peak 3.9 GB instead of 2.8 GB). False where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # M_MMAP_THRESHOLD; setting it also stops the raising
    except (OSError, AttributeError):
        return False
