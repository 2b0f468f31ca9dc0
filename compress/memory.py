"""How much host memory there is to spend: what decides between in-memory and bounded-memory paths,
and where tensors go when they do not fit (`OnDisk`)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["available_memory", "release_large_blocks", "spill_needed", "OnDisk", "SPILL_SHARE"]


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
    one layer at a time then leaves every layer's worth of freed memory resident. False where the
    C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # M_MMAP_THRESHOLD; setting it also stops the raising
    except (OSError, AttributeError):
        return False


SPILL_SHARE = 0.25  # of the available memory: intermediate tensors larger than this go to disk


def spill_needed(nbytes: int) -> bool:
    """Whether `nbytes` of intermediate tensors (Týr's supernet, calibration activations) should
    live on disk (`OnDisk`) rather than in memory."""
    return nbytes > SPILL_SHARE * available_memory()


class OnDisk:
    """Tensors written to a safetensors file of their own in `folder` and read back one at a time on
    use (memory-mapped), onto the device they came from. The file is deleted when the last
    reference to this goes."""

    def __init__(self, folder: str | Path, tensors: dict):
        import tempfile
        import weakref

        from safetensors.torch import save_file

        fd, path = tempfile.mkstemp(suffix=".safetensors", dir=folder)
        os.close(fd)
        self.path, self.names = Path(path), {str(k) for k in tensors}
        self.device = next(iter(tensors.values())).device
        weakref.finalize(self, self.path.unlink, missing_ok=True)
        save_file({str(k): v.detach().cpu().contiguous() for k, v in tensors.items()}, path)

    def __contains__(self, key) -> bool:
        return str(key) in self.names

    def __getitem__(self, key):
        from safetensors import safe_open

        if str(key) not in self.names:
            raise KeyError(key)
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(str(key)).to(self.device)
