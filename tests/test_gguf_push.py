"""GGUF files on the Hub: `compress push --include-gguf` (and `export --gguf --push-to-hub`) uploads
the folder's GGUF and the card gains its llama.cpp / ollama lines; without the flag the GGUF stays
home (it is as large as the weights) and the card says nothing of it. Against test_hub's fake Hub."""

from __future__ import annotations

import shutil

import pytest

from compress.cli import main
from test_hub import FAST, REPO, _one_error_line, _point_at, hub, online  # noqa: F401 (fixtures)
from test_pipeline import save_dense
from tiny import tiny_model

GGUF = "gguf/slim-F32.gguf"


@pytest.fixture(scope="module")
def exported(hub, tmp_path_factory):  # noqa: F811
    """A tiny Llama exported with `--gguf f32 --push-to-hub`; what landed is kept."""
    root = tmp_path_factory.mktemp("gguf_hub")
    dense, out = save_dense(tiny_model("llama"), root / "dense"), root / "slim"
    with pytest.MonkeyPatch.context() as mp:
        hub.reset()
        _point_at(mp, hub)
        argv = ["export", "--model", str(dense), "--method", "flap", "--ratio", "0.3", "--out", str(out), *FAST]
        assert main([*argv, "--threads", "1", "--gguf", "f32", "--push-to-hub", "acme/exported"]) == 0
        [commit] = hub.commits
    return out, commit


def test_export_with_gguf_pushes_it_and_the_card_says_how_to_run_it(exported):
    out, commit = exported
    assert commit["files"][GGUF] == (out / GGUF).read_bytes()
    card = commit["files"]["README.md"].decode()
    assert "ollama run hf.co/acme/exported:F32" in card and "llama-cli -hf acme/exported:F32" in card
    assert f"| `{GGUF}` | f32 |" in card and "- gguf\n" in card


def test_push_leaves_gguf_out_unless_asked(exported, online, caplog):  # noqa: F811
    out, _ = exported
    assert main(["push", str(out), "--repo", REPO]) == 0
    [commit] = online.commits
    assert not [p for p in commit["files"] if p.endswith(".gguf")] and "add --include-gguf" in caplog.text
    assert "ollama" not in commit["files"]["README.md"].decode()
    online.reset()
    assert main(["push", str(out), "--repo", REPO, "--include-gguf"]) == 0
    [commit] = online.commits
    assert GGUF in commit["files"] and f"ollama run hf.co/{REPO}:F32" in commit["files"]["README.md"].decode()


def test_include_gguf_without_one_is_one_line(exported, online, capfd, tmp_path):  # noqa: F811
    out, _ = exported
    folder = shutil.copytree(out, tmp_path / "slim", ignore=shutil.ignore_patterns("gguf"))
    assert main(["push", str(folder), "--repo", REPO, "--include-gguf"]) == 2
    _one_error_line(capfd, "has no GGUF file", "compress gguf")
    assert online.commits == []
