"""Layer-streamed export: the same bytes as the in-memory path, checked as strictly, bounded input."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from transformers import GenerationConfig

from compress.cli import main
from compress.errors import CompressError
from compress.pipeline import prune, streaming_for
from compress.source import DenseStream
from exporters.hf_folder import INDEX_FILE, ShardWriter
from test_pipeline import FAST, save_dense, tamper
from tiny import TINY_CONFIGS, tiny_model

OWN = {"report.json", "report.md"}  # timings and which checks ran differ by design


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name not in OWN}


# every family with FLAP (its rewritten biases touch the most of a layer), the other methods' scoring
# on a family each: the family's layer reading and the method's streamed scoring are independent
@pytest.mark.parametrize("family, method", [(f, "flap") for f in sorted(TINY_CONFIGS)]
                         + [("opt", "wanda-sp"), ("phi3", "magnitude")])
def test_streamed_export_writes_the_same_bytes(family, method, tmp_path):
    """Every file but the report equals the in-memory export's: plan (fingerprint included),
    FLAP's rewritten biases, config and each shard, also split into several shards."""
    dense = save_dense(tiny_model(family), tmp_path / "dense")
    GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9, eos_token_id=2).save_pretrained(dense)  # a checkpoint's own
    out = {}
    for streaming in ("off", "on"):
        out[streaming] = tmp_path / streaming
        assert main(["export", "--model", str(dense), "--method", method, "--ratio", "0.4", "--out",
                     str(out[streaming]), "--streaming", streaming, "--max-shard-size", "150KB", *FAST]) == 0
    a, b = _files(out["off"]), _files(out["on"])
    assert a.keys() == b.keys() and len([n for n in a if n.startswith("model-")]) > 1
    assert [n for n in a if a[n] != b[n]] == []
    ra, rb = (json.loads((out[s] / "report.json").read_text()) for s in ("off", "on"))
    assert rb["streamed"] and [c["name"] for c in rb["parity"]] == ["layers", "files"]
    for qa, qb in zip(ra["quality"], rb["quality"], strict=True):
        figures = ("perplexity", "reference_perplexity", "kl", "top1_agreement")
        assert [qa[k] for k in figures] == pytest.approx([qb[k] for k in figures], rel=1e-5)
        assert {k: v for k, v in qa.items() if k not in figures} == {k: v for k, v in qb.items() if k not in figures}


@pytest.mark.parametrize("method", ["flap", "wanda-sp"])
def test_activations_spilled_to_disk_give_the_same_bytes(method, tmp_path, monkeypatch, capsys):
    """Past their memory share the calibration activations live on disk, a file per batch and
    boundary, deleted as the stream moves on: the export is byte for byte the in-memory one's."""
    from compress import memory

    dense = save_dense(tiny_model("llama"), tmp_path / "dense")
    args = ["export", "--model", str(dense), "--method", method, "--ratio", "0.4", "--streaming", "on",
            "--calib-batch-size", "3", *FAST]
    assert main([*args, "--out", str(tmp_path / "memory")]) == 0
    assert "kept on disk" not in capsys.readouterr().out
    written, present, real = [], [], memory.OnDisk.__init__

    def spy(self, folder, tensors):
        real(self, folder, tensors)
        written.append(self.path)
        present.append(len(list(self.path.parent.iterdir())))

    monkeypatch.setattr(memory.OnDisk, "__init__", spy)
    monkeypatch.setattr(memory, "SPILL_SHARE", 0.0)
    assert main([*args, "--out", str(tmp_path / "disk")]) == 0
    assert "kept on disk" in capsys.readouterr().out
    layers, batches = dense_layers(dense), 3  # 8 windows in batches of 3
    assert len(written) == (layers + 1) * batches and not any(p.exists() for p in written)
    assert max(present) <= 2 * batches  # a boundary's files go once the next layer has run
    assert not written[0].parent.exists()
    a, b = _files(tmp_path / "memory"), _files(tmp_path / "disk")
    assert [n for n in a if a[n] != b.get(n)] == []


def dense_layers(folder) -> int:
    return json.loads((folder / "config.json").read_text())["num_hidden_layers"]


def test_a_hub_id_streams_from_its_snapshot_in_the_cache(tmp_path, monkeypatch):
    """A Hub id is streamed from its snapshot in the Hugging Face cache (here built by hand; the
    suite runs offline): same bytes as the folder loaded whole; a repo without safetensors or
    one that is not there is a one-line error under `--streaming on`."""
    from huggingface_hub import constants

    sha = "0123456789abcdef" * 2 + "01234567"
    repo = tmp_path / "hub" / "models--acme--tiny"
    snapshot = save_dense(tiny_model("qwen2"), repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert streaming_for("on", "acme/tiny", "flap", False, "auto") == snapshot
    args = ["export", "--method", "flap", "--ratio", "0.4", *FAST]
    assert main([*args, "--model", "acme/tiny", "--streaming", "on", "--out", str(tmp_path / "hub-streamed")]) == 0
    assert main([*args, "--model", str(snapshot), "--streaming", "off", "--out", str(tmp_path / "whole")]) == 0
    a, b = _files(tmp_path / "whole"), _files(tmp_path / "hub-streamed")
    assert a.keys() == b.keys() and [n for n in a if a[n] != b[n]] == []
    assert json.loads((tmp_path / "hub-streamed" / "report.json").read_text())["base_model"] == "acme/tiny"
    for f in snapshot.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(CompressError, match="nor a local folder or Hub repository of safetensors"):
        streaming_for("on", "acme/tiny", "flap", False, "auto")
    with pytest.raises(CompressError, match="cannot download acme/other"):
        streaming_for("on", "acme/other", "flap", False, "auto")


def test_streamed_layer_check_catches_a_wrong_slim_tensor(tmp_path, monkeypatch, capsys):
    """A slim tensor off by 1e-3 in one layer fails the streamed export, and nothing is written."""
    import compress.pipeline as pipeline

    dense = save_dense(tiny_model("llama"), tmp_path / "dense")
    real = pipeline.slim_layer_state_dict

    def off(model, adapter, plan, i, replaced=None):
        sd = real(model, adapter, plan, i, replaced)
        if i == 1:
            sd["mlp.down_proj.weight"] = sd["mlp.down_proj.weight"].clone()
            sd["mlp.down_proj.weight"][0, 0] += 1e-3
        return sd

    monkeypatch.setattr(pipeline, "slim_layer_state_dict", off)
    out = tmp_path / "slim"
    assert main(["export", "--model", str(dense), "--method", "flap", "--ratio", "0.4", "--out", str(out),
                 "--streaming", "on", *FAST]) == 2
    assert "layers" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".slim*"))


def test_streamed_files_check_catches_a_shard_that_reads_back_wrong(tmp_path, monkeypatch, capsys):
    import exporters.hf_folder as hf_folder

    real = hf_folder._Shard.finish

    def corrupt(self):
        real(self)
        with self.path.open("r+b") as f:  # flip one byte of the last tensor's data
            f.seek(-1, 2)
            last = f.read(1)
            f.seek(-1, 2)
            f.write(bytes([last[0] ^ 1]))

    dense = save_dense(tiny_model("qwen2"), tmp_path / "dense")
    monkeypatch.setattr(hf_folder._Shard, "finish", corrupt)
    out = tmp_path / "slim"
    assert main(["export", "--model", str(dense), "--method", "wanda-sp", "--ratio", "0.4", "--out", str(out),
                 "--streaming", "on", *FAST]) == 2
    printed = capsys.readouterr()
    assert "read back from disk differs" in printed.out and "files" in printed.err and not out.exists()


def test_shards_split_as_huggingface_hub_splits_them(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {f"t{i}": torch.randn(n, generator=g) for i, n in enumerate([100, 300, 50, 700, 20, 20, 260])}
    want = split_torch_state_dict_into_shards(sd, filename_pattern="model{suffix}.safetensors", max_shard_size=1200)
    writer = ShardWriter(tmp_path, 1200)
    for k, v in sd.items():
        writer.add(k, v)
    assert writer.close() == sum(v.numel() * 4 for v in sd.values())
    assert json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"] == dict(sorted(want.tensor_to_filename.items()))


def test_streaming_choice(tmp_path, monkeypatch):
    """auto streams only where the whole-model checks would not fit; `on` says why it cannot."""
    from compress import memory

    dense = save_dense(tiny_model("llama"), tmp_path / "dense")
    assert streaming_for("auto", str(dense), "flap", False, "auto") is None
    assert streaming_for("on", str(dense), "flap", False, "auto") == dense
    for args, why in (((str(dense), "tyr", False, "auto"), "needs the whole model"),
                      ((str(dense), "flap", True, "auto"), "--runtime"),
                      ((str(dense), "flap", False, "model"), "--parity-scope model"),
                      ((str(tmp_path / "m.gguf"), "flap", False, "auto"), "not a GGUF file nor a local folder")):
        with pytest.raises(CompressError, match=why):
            streaming_for("on", *args)
    monkeypatch.setattr(memory, "available_memory", lambda: 1024)
    assert streaming_for("auto", str(dense), "wanda-sp", False, "auto") == dense
    assert streaming_for("auto", str(dense), "disp", False, "auto") is None
    assert streaming_for("off", str(dense), "wanda-sp", False, "auto") is None


def test_a_layer_holds_memory_only_while_it_is_read(tmp_path):
    dense = save_dense(tiny_model("opt"), tmp_path / "dense")
    stream = DenseStream(dense)
    layers = stream.adapter.layers(stream.model)
    assert all(p.is_meta for layer in layers for p in layer.parameters())
    assert not stream.model.get_input_embeddings().weight.is_meta
    with stream.layer(1) as layer:
        assert not any(p.is_meta for p in layer.parameters())
        assert all(p.is_meta for p in layers[0].parameters())
    assert all(p.is_meta for p in layers[1].parameters())
    with pytest.raises(CompressError, match="whole model"):
        prune(stream, "tyr", 0.5, torch.zeros(2, 8, dtype=torch.long))


def test_streamed_validate_passes_then_catches_a_tampered_tensor_and_another_model(tmp_path, capsys):
    """`validate --streaming on` checks a folder layer by layer against a dense model it never holds:
    the folder as written passes; a plan made for another model is refused; one weight changed by
    1e-3 fails the files check."""
    dense = save_dense(tiny_model("phi3"), tmp_path / "dense")
    out = tmp_path / "slim"
    assert main(["export", "--model", str(dense), "--method", "flap", "--ratio", "0.4", "--out", str(out),
                 "--streaming", "on", *FAST]) == 0
    assert main(["validate", str(out), "--model", str(dense), "--streaming", "on"]) == 0
    assert "layers one at a time" in capsys.readouterr().out
    other = save_dense(tiny_model("phi3", seed=1), tmp_path / "other")
    assert main(["validate", str(out), "--model", str(other), "--streaming", "on"]) == 2
    assert "fingerprint" in capsys.readouterr().err
    tamper(out, "mlp.down_proj.weight")
    assert main(["validate", str(out), "--model", str(dense), "--streaming", "on"]) == 2
    assert "files" in capsys.readouterr().err
