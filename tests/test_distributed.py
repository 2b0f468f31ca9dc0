"""Data-parallel DISP on CPU (gloo), two processes started as users start them (torchrun): the
same losses and plan as one process at the same global batch and seed; Týr's search split over
them gives one process's plan; a rank that fails stops every rank, in one line, and nothing is
exported; the same command resumes and rank 0 alone writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compress.cli import main
from compress.distributed import World
from compress.errors import CompressError
from ranks_driver import recovered, train
from tiny import tiny_folder, tiny_model

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("ranks_driver.py")
DISP = ["--method", "disp", "--ratio", "0.5", "--steps", "12", "--batch-size", "4", "--seq-len", "16",
        "--calib-samples", "8", "--eval-windows", "0"]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def flipped(one: dict, two: dict) -> float:
    """The share of channels kept by one plan and not the other (near-ties the summation order decides)."""
    a, b = kept(one), kept(two)
    return sum(a[k] != b[k] for k in a) / len(a)


def kept(plan: dict) -> dict:
    """(layer, field, channel) -> kept, for every channel of every structure of the tiny Llama."""
    c = tiny_model("llama").config
    widths = {"attn_in": c.hidden_size, "attn_out": c.hidden_size, "mlp_in": c.hidden_size,
              "mlp_hidden": c.intermediate_size, "mlp_out": c.hidden_size}
    out = {}
    for i, layer in enumerate(plan["layers"]):
        for name, width in widths.items():
            chosen = set(range(width)) if layer.get(name) is None else set(layer[name])
            out.update({(i, name, c): c in chosen for c in range(width)})
    return out


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    return tiny_folder(tmp_path_factory.mktemp("dense"))


def test_two_processes_train_what_one_does(tmp_path):
    """DISP with the frozen model replicated and sharded (FSDP2; --objective kl too), and recovery:
    one process's losses, plan and trained tensors."""
    res = torchrun(str(DRIVER), "train", str(tmp_path / "two.json"))
    assert res.returncode == 0, res.stderr[-3000:]
    runs = json.loads((tmp_path / "two.json").read_text())
    one, kl = train(World()), train(World(), objective="kl")
    for two, alone in ((runs["replicate"], one), (runs["fsdp"], one), (runs["kl"], kl)):
        assert torch.allclose(torch.tensor(two["trace"]), torch.tensor(alone["trace"]), rtol=1e-5, atol=1e-6)
        assert flipped(alone["plan"], two["plan"]) < 0.01
    alone = recovered(World())
    assert runs["recover"]["kl"] == pytest.approx(alone["kl"], rel=1e-5)
    assert alone["tensors"].keys() == runs["recover"]["tensors"].keys()
    for name, value in alone["tensors"].items():
        assert torch.allclose(torch.tensor(runs["recover"]["tensors"][name]), torch.tensor(value), atol=1e-5), name


def test_two_processes_search_what_one_does(tmp_path):
    """Týr's candidates scored in turns by two ranks: the scores, so the search and plan, are one's."""
    res = torchrun(str(DRIVER), "search", str(tmp_path / "two.json"))
    assert res.returncode == 0, res.stderr[-3000:]
    two, one = json.loads((tmp_path / "two.json").read_text()), train(World(), "search")
    assert two == json.loads(json.dumps(one))


def test_a_failing_rank_stops_all_and_the_command_resumes_under_torchrun(dense, tmp_path):
    """Rank 1 fails at step 3: every rank stops, its cause in one line, no export; rank 0 had saved
    a step before (a save after every step; the launcher may stop it mid-save, which leaves the one
    before). The same command resumes there (rank 0 reads the state and sends it to rank 1) and
    writes one export, the plan of one process."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["export", "--model", str(dense), "--out", str(one), *DISP]) == 0
    command = ["export", "--model", str(dense), "--out", str(two), *DISP, "--save-every", "0.001"]
    res = torchrun(str(DRIVER), "fail", "1", *command)
    assert res.returncode != 0
    assert "error: rank 1: ValueError: a failure planted on rank 1\n" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two.partial"]  # no export, no staging

    res = torchrun("-m", "compress", *command)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "disp: resuming at step " in res.stdout
    assert res.stdout.count(f"wrote {two}") == 1  # rank 0 alone writes and speaks
    assert flipped(*[json.loads((d / "plan.json").read_text()) for d in (one, two)]) < 0.01
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # the state removed once written


def test_recovery_after_a_rank_0_method_under_torchrun_with_fsdp(dense, tmp_path):
    """FLAP runs on rank 0 alone and hands its result over; both ranks recover it, the teacher
    sharded: the export is one process's (the same plan, the weights equal within float error);
    `compress recover` under torchrun too."""
    from safetensors.torch import load_file

    command = ["--method", "flap", "--ratio", "0.5", "--seq-len", "16", "--calib-samples", "12", "--eval-windows",
               "0", "--recover", "--recover-steps", "3", "--recover-batch-size", "4"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["export", "--model", str(dense), "--out", str(one), *command]) == 0
    res = torchrun("-m", "compress", "export", "--model", str(dense), "--out", str(two), *command, "--shard", "fsdp")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count(f"wrote {two}") == 1
    assert (one / "plan.json").read_text() == (two / "plan.json").read_text()
    a, b = (load_file(d / "model.safetensors") for d in (one, two))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)

    again = ["recover", str(one), "--teacher", str(dense), "--steps", "2", "--batch-size", "4", "--seq-len", "16",
             "--calib-samples", "12", "--eval-windows", "0"]  # `compress recover` on a folder, likewise
    assert main([*again, "--out", str(tmp_path / "r1")]) == 0
    res = torchrun("-m", "compress", *again, "--out", str(tmp_path / "r2"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("wrote ") == 1 and not (tmp_path / "r2.partial").exists()
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("r1", "r2"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_a_batch_that_does_not_split_and_a_shard_without_processes_are_refused(dense, tmp_path, capsys):
    with pytest.raises(CompressError, match="multiple of 3"):
        World(rank=0, size=3).share(torch.zeros(4, 2))
    assert main(["export", "--model", str(dense), "--out", str(tmp_path / "x"), *DISP, "--shard", "fsdp"]) == 2
    assert "--shard fsdp splits the model over several processes" in capsys.readouterr().err
    assert main(["export", "--model", str(dense), "--out", str(tmp_path / "x"), "--method", "flap", "--shard",
                 "fsdp"]) == 2
    assert "--method flap trains neither" in capsys.readouterr().err
