"""Resume: an export killed mid-training (SIGKILL, no chance to clean up) and run again ends in the
bytes of a run never stopped; a state saved by other settings is refused; what a state holds
(optimizer, scheduler, generators, the batch order) comes back exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from compress import prune
from compress.checkpoint import Checkpoint, StateStore, partial_folder
from compress.cli import main
from compress.recover import recover
from compress.training import Batches
from tiny import tiny_folder, tiny_model

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40
DISP = ["--method", "disp", "--ratio", "0.5", "--steps", str(STEPS), "--batch-size", "2", "--seq-len", "16",
        "--calib-samples", "8", "--eval-windows", "0", "--save-every", "0.001"]  # a save after every step


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    return tiny_folder(tmp_path_factory.mktemp("dense"))


def saved_step(out: Path) -> int:
    """The step of the DISP state saved for an export to `out` (-1: none yet)."""
    try:
        with safe_open(str(partial_folder(out) / "disp.safetensors"), framework="pt") as f:
            return json.loads(f.metadata()["state"])["step"]
    except Exception:  # not there yet
        return -1


def test_a_killed_export_resumes_to_the_same_bytes(dense, tmp_path, capsys):
    whole = tmp_path / "whole"
    assert main(["export", "--model", str(dense), "--out", str(whole), *DISP]) == 0
    assert not partial_folder(whole).exists()  # a written export leaves no state behind

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "compress", "export", "--model", str(dense), "--out", str(out),
                             *DISP], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while saved_step(out) < 8 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    killed_at = saved_step(out)
    assert 8 <= killed_at < STEPS and not out.exists()

    assert main(["export", "--model", str(dense), "--out", str(out), *DISP]) == 0
    assert f"disp: resuming at step {killed_at} " in capsys.readouterr().out
    assert (out / "plan.json").read_text() == (whole / "plan.json").read_text()
    assert (out / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    assert not partial_folder(out).exists()


def test_a_stopped_recovery_resumes_to_the_same_tensors(tmp_path, monkeypatch):
    """Recovery's loop (student, AdamW, warmup+cosine schedule, batches) stopped after a save at step
    4 of 10 (the process exits there) and run again trains exactly what one run does."""
    model = tiny_model("llama")
    calib = torch.randint(0, 4096, (12, 16), generator=torch.Generator().manual_seed(0))
    result = prune(model, "magnitude", 0.5)
    settings = dict(steps=10, batch_size=2, lora=False, progress=False)
    whole = recover(model, result, calib, **settings)

    store, after_step = StateStore(tmp_path, every=0), Checkpoint.after_step

    def exit_at_4(self, step, steps, extra):
        after_step(self, step, steps, extra)
        if step == 4:
            raise SystemExit("stopped")

    monkeypatch.setattr(Checkpoint, "after_step", exit_at_4)
    with pytest.raises(SystemExit):
        recover(model, result, calib, store=store, **settings)
    monkeypatch.setattr(Checkpoint, "after_step", after_step)
    resumed = recover(model, result, calib, store=store, **settings)
    assert resumed.replaced.keys() == whole.replaced.keys()
    assert all(torch.equal(resumed.replaced[k], whole.replaced[k]) for k in whole.replaced)
    with pytest.raises(Exception, match="was saved by another run"):  # the finished state, other settings
        recover(model, result, calib, store=store, **{**settings, "steps": 11})


@pytest.mark.parametrize("stop", [3, 4])  # the end of the first iteration; a generation into the second
def test_a_stopped_tyr_search_resumes_to_the_same_plan(tmp_path, monkeypatch, stop):
    """Týr's search (2 iterations x 3 generations) stopped after a save and run again: the same
    plan, refitted tensors and trace as one run (the supernet rebuilt from the saved centres, the
    offspring's generator where it was)."""
    from compress.adapters import get_adapter
    from compress.methods.tyr import Tyr

    model = tiny_model("llama")
    calib = torch.randint(0, 4096, (8, 16), generator=torch.Generator().manual_seed(0))

    def run(store=None):
        tyr = Tyr(iterations=2, generations=3, offspring=6, fidelity_windows=[1, 2], hessian_windows=4)
        tyr.store = store
        result = tyr.prune(model, get_adapter(model.config), 0.5, calib, seed=0)
        return result, tyr.trace

    (whole, trace), store, after_step = run(), StateStore(tmp_path, every=0), Checkpoint.after_step

    def exit_at(self, step, steps, extra):
        after_step(self, step, steps, extra)
        if step == stop:
            raise SystemExit("stopped")

    monkeypatch.setattr(Checkpoint, "after_step", exit_at)
    with pytest.raises(SystemExit):
        run(store)
    monkeypatch.setattr(Checkpoint, "after_step", after_step)
    resumed, resumed_trace = run(store)
    assert resumed.plan.to_dict() == whole.plan.to_dict() and resumed_trace == trace
    assert resumed.replaced.keys() == whole.replaced.keys()
    assert all(torch.equal(resumed.replaced[k], whole.replaced[k]) for k in whole.replaced)


def test_a_state_from_other_settings_is_refused(dense, tmp_path, capsys):
    out = tmp_path / "slim"
    store = StateStore(partial_folder(out), every=0)
    store.write("disp", {"x": torch.zeros(1)}, {"fingerprint": {"settings": {"lam": 1.0}}, "step": 3})
    assert main(["export", "--model", str(dense), "--out", str(out), *DISP]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the weights' loading bar
    assert err.startswith("error: ") and "was saved by another run (" in err and "settings" in err
    assert "start over" in err
    assert not out.exists() and store.path("disp").exists()  # left for the user to decide


def _parts(seed: int):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1))
    gen = torch.Generator().manual_seed(seed)
    stream = Batches(torch.arange(10).view(5, 2), 2, gen)
    return {"net": net, "optimizer": opt, "scheduler": sched, "generator": gen, "batches": stream}


def _step(parts) -> torch.Tensor:
    x = next(parts["batches"]).float() + torch.rand(2, 2, generator=parts["generator"])
    loss = parts["net"](torch.cat([x, torch.randn(2, 1)], 1)).square().sum()  # the global RNG too
    parts["optimizer"].zero_grad()
    loss.backward()
    parts["optimizer"].step()
    parts["scheduler"].step()
    return loss.detach()


def test_a_restored_state_continues_exactly(tmp_path):
    """Three steps, save, three more == three steps, restore into fresh objects, three more."""
    torch.manual_seed(0)
    a = _parts(1)
    for _ in range(3):
        _step(a)
    fp = {"run": 1}
    Checkpoint(StateStore(tmp_path, every=0), "loop", fp, a, torch.device("cpu")).save(3, {"trace": [0.5]})
    want = torch.stack([_step(a) for _ in range(3)])
    torch.manual_seed(123)  # the global RNG state is restored too
    b = _parts(2)
    assert Checkpoint(StateStore(tmp_path, every=0), "loop", fp, b, torch.device("cpu")).restore() == (3,
                                                                                                     {"trace": [0.5]})
    assert torch.equal(torch.stack([_step(b) for _ in range(3)]), want)
    assert b["optimizer"].state_dict()["param_groups"] == a["optimizer"].state_dict()["param_groups"]
    assert torch.equal(b["net"].weight, a["net"].weight)


def test_a_save_leaves_no_partial_file(tmp_path):
    """The state is replaced by one rename: no temporary file stays, the old state is whole until then."""
    store = StateStore(tmp_path / "s", every=0)
    store.write("disp", {"x": torch.ones(2)}, {"step": 1})
    store.write("disp", {"x": torch.zeros(2)}, {"step": 2})
    assert [p.name for p in store.folder.iterdir()] == ["disp.safetensors"]
    tensors, meta = store.read("disp")
    assert meta["step"] == 2 and torch.equal(tensors["x"], torch.zeros(2))
