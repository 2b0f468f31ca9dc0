"""A training loop's state kept between runs, so a killed or interrupted job resumes where it
stopped and ends with the same bytes as a run that never stopped.

Each loop (DISP's hypernetwork, recovery's student) keeps one file in `<out>.partial/`, e.g.
`disp.safetensors`: the tensors (weights, optimizer moments, RNG states, this epoch's batch order)
as safetensors, the rest (step, scheduler, loss trace, and a fingerprint of the settings, the
calibration windows and the model) as JSON in the file's metadata. A save is one file written
under a temporary name and renamed, so a kill mid-save leaves the previous state whole; nothing
is pickled. A state whose fingerprint differs from the run's is refused. Rank 0 reads and writes
the file; under several processes it sends the bytes it read to the others.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file
from tqdm.auto import tqdm

from compress.distributed import World
from compress.errors import CompressError
from compress.plan import model_identity, tensor_digest

__all__ = ["StateStore", "Checkpoint", "partial_folder", "fingerprint", "result_digest", "metadata_of"]

STATE_VERSION = 1


def partial_folder(out: str | Path) -> Path:
    """Where an export to `out` keeps its training state until it is written."""
    out = Path(out).resolve()
    return out.with_name(out.name + ".partial")


def fingerprint(model, adapter, calib: torch.Tensor, **settings) -> dict:
    """What a saved state must have been made with: these settings, these calibration windows, this
    model (`compress.plan.model_identity`)."""
    data = hashlib.sha256(calib.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:32]
    return {"version": STATE_VERSION, "settings": json.loads(json.dumps(settings)),
            "calibration": f"{tuple(calib.shape)} {data}", "model": model_identity(model, adapter.geometry())}


def result_digest(plan, replaced: dict[str, torch.Tensor]) -> str:
    """A pruning result in 32 hex digits (its plan and the tensors it rewrote): where recovery starts."""
    h = hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True).encode())
    for name in sorted(replaced):
        h.update(tensor_digest(name, replaced[name]))
    return h.hexdigest()[:32]


def metadata_of(data: bytes) -> dict[str, str]:
    """The string metadata of safetensors bytes (its header: 8 bytes of length, then JSON)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n])["__metadata__"]


class StateStore:
    """A folder of training states (`<out>.partial/`), saved every `every` seconds; rank 0 writes."""

    def __init__(self, folder: str | Path, every: float, world: World | None = None):
        self.folder, self.every, self.world = Path(folder), every, world or World()

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.safetensors"

    def read(self, name: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """(tensors, metadata) of a saved state, or None."""
        data = None
        if self.world.writer and self.path(name).exists():
            data = self.path(name).read_bytes()
        data = self.world.broadcast_bytes(data)
        if data is None:
            return None
        try:
            meta = json.loads(metadata_of(data)["state"])
            return load_bytes(data), meta
        except Exception as e:  # a truncated or foreign file (safetensors raises its own error types)
            raise CompressError(f"{self.path(name)}: not a training state ({e}); remove {self.folder} to start "
                                "over") from None

    def write(self, name: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Atomically: a temporary file, flushed to disk, renamed over the old state."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path(name).with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"state": json.dumps(meta)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path(name))

    def remove(self) -> None:
        """After a finished export: the states are no longer needed."""
        if self.world.writer and self.folder.exists():
            for f in self.folder.iterdir():
                f.unlink()
            self.folder.rmdir()


class Checkpoint:
    """One loop's state: `parts` (modules, optimizers, schedulers, generators and objects with
    tensor-valued `state_dict`), the global RNG states and the step. A context manager: inside it
    Ctrl-C is deferred to the end of the step, which saves and stops. Without a store it does
    nothing (and Ctrl-C stops at once, as before)."""

    def __init__(self, store: StateStore | None, name: str, fingerprint: dict, parts: dict, device: torch.device):
        self.store, self.name, self.fingerprint, self.parts, self.device = store, name, fingerprint, parts, device
        self.world = store.world if store is not None else World()
        self.last = time.monotonic()
        self.interrupted = threading.Event()
        self._previous = None

    def restore(self) -> tuple[int, dict]:
        """(the step to go on from, the loop's extras as saved): (0, {}) when there is no state."""
        saved = self.store.read(self.name) if self.store is not None else None
        if saved is None:
            return 0, {}
        tensors, meta = saved
        if meta.get("fingerprint") != self.fingerprint:
            differ = [k for k in self.fingerprint if meta.get("fingerprint", {}).get(k) != self.fingerprint[k]]
            raise CompressError(f"{self.store.path(self.name)} was saved by another run ({', '.join(differ)} differ): "
                                f"run the same command as before to resume it, or remove {self.store.folder} to "
                                "start over")
        for key, part in self.parts.items():
            _load_part(part, {k[len(key) + 1:]: t for k, t in tensors.items() if k.startswith(key + ".")},
                       meta["parts"].get(key))
        torch.set_rng_state(tensors["rng.cpu"])
        if torch.cuda.is_available():  # the devices saved and present now
            for i in range(torch.cuda.device_count()):
                if f"rng.cuda.{i}" in tensors:
                    torch.cuda.set_rng_state(tensors[f"rng.cuda.{i}"], i)
        if self.world.writer:
            print(f"{self.name}: resuming at step {meta['step']} from {self.store.folder}")
        return meta["step"], meta["extra"]

    def save(self, step: int, extra: dict) -> None:
        if self.store is None or not self.world.writer:
            return
        tensors, parts = {"rng.cpu": torch.get_rng_state()}, {}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        for key, part in self.parts.items():
            own, parts[key] = _part_state(part)
            tensors.update({f"{key}.{k}": t.detach().cpu().clone() for k, t in own.items()})
        meta = {"fingerprint": self.fingerprint, "step": step, "extra": extra, "parts": parts}
        self.store.write(self.name, tensors, meta)
        self.last = time.monotonic()

    def after_step(self, step: int, steps: int, extra: dict) -> None:
        """Save when due (every `store.every` seconds, and after the last step); on Ctrl-C (on any
        rank) save and raise KeyboardInterrupt with a line saying how to resume."""
        if self.store is None:
            return
        stop = self.world.any(self.interrupted.is_set(), self.device)
        if stop or step == steps or time.monotonic() - self.last >= self.store.every:
            self.save(step, extra)
        if stop:
            if self.world.writer:  # below any progress bar
                tqdm.write(f"{self.name}: stopped at step {step} of {steps}; its state is in {self.store.folder}: "
                           "run the same command again to resume")
            raise KeyboardInterrupt

    def __enter__(self) -> Checkpoint:
        if self.store is not None and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._defer)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _defer(self, signum, frame) -> None:
        """The first Ctrl-C stops at the end of the step; a second one at once."""
        self.interrupted.set()
        signal.signal(signal.SIGINT, self._previous)


def _part_state(part) -> tuple[dict[str, torch.Tensor], object]:
    """(tensors, JSON) of one part."""
    if isinstance(part, torch.Generator):
        return {"state": part.get_state()}, None
    if isinstance(part, torch.optim.lr_scheduler.LRScheduler):
        return {}, part.state_dict()
    if isinstance(part, torch.optim.Optimizer):
        sd = part.state_dict()
        tensors, scalars = {}, {}
        for i, state in sd["state"].items():
            for k, v in state.items():
                (tensors if torch.is_tensor(v) else scalars)[f"{i}.{k}"] = v
        return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}
    return dict(part.state_dict()), None


def _load_part(part, tensors: dict[str, torch.Tensor], saved) -> None:
    if isinstance(part, torch.Generator):
        part.set_state(tensors["state"])
    elif isinstance(part, torch.optim.lr_scheduler.LRScheduler):
        part.load_state_dict(saved)
    elif isinstance(part, torch.optim.Optimizer):
        state: dict[int, dict] = {}
        for key, v in [*tensors.items(), *saved["scalars"].items()]:
            i, k = key.split(".", 1)
            state.setdefault(int(i), {})[k] = v
        groups = [{k: tuple(v) if isinstance(now.get(k), tuple) else v for k, v in group.items()}
                  for group, now in zip(saved["param_groups"], part.param_groups)]  # JSON made tuples lists
        part.load_state_dict({"state": state, "param_groups": groups})
    else:
        part.load_state_dict(tensors)
