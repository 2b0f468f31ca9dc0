"""Pruning and exporting a checkpoint read from its safetensors files one decoder layer at a time.

For the score-based methods (magnitude, wanda-sp, flap), whose statistics, scores and rewritten
tensors are all per layer. The dense model is built on the meta device; only the embeddings,
final norm and LM head are read in full. Then:

1. pruning: the calibration windows' hidden states enter layer 0; each layer in turn is read,
   runs them (collecting its input statistics), is scored and released; the plan is then
   selected from all layers' scores, exactly as in memory;
2. export: each layer is read again, its rewritten tensors (FLAP's biases) and slim tensors are
   built, checked against the masked dense layer in float64 (the layer-by-layer parity check),
   run on the held-out windows beside the dense layer for the report's quality figures, and
   appended to the output shard; each finished shard is read back and compared.

Peak memory is the shared tensors, one layer (and its float64 copies), the hidden states of the
windows at two layer boundaries (on disk, a batch in memory at a time, when they would take over
a quarter of the memory) and one output shard: a 7B bfloat16 checkpoint exports on a 24 GiB
machine. A Hub id is read from its snapshot in the Hugging Face cache, a GGUF file from a
temporary safetensors copy (`compress.gguf_folder`). The output is byte-identical to the
in-memory path's (tests/test_streaming.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import NamedTuple
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.adapters import get_adapter
from compress.errors import CompressError
from compress.methods import METHODS, PruneResult
from compress.methods.select import ScoredMethod
from compress.plan import model_identity, tensor_digest
from exporters.hf_folder import open_safetensors

__all__ = ["DenseStream", "StreamedPrune", "prune_streamed", "export_streamed", "validate_streamed", "streamable_folder", "choose_streaming"]


# What a streamed Hub model needs from its repository (the tokenizer is loaded on its own).
HUB_FILES = ["*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json"]


def streamable_folder(name_or_path) -> Path | None:
    """What a model would be streamed from: a local safetensors folder as it is; for a Hub id, its
    snapshot in the Hugging Face cache, with the safetensors and config files downloaded (as
    loading the model whole would download them); a GGUF file as it is (`DenseStream` rewrites
    it as safetensors first); None without safetensors."""
    if not name_or_path:
        from compress.loading import default_model_dir

        return default_model_dir()
    path = Path(name_or_path)
    if path.suffix.lower() == ".gguf":
        return path if path.is_file() else None
    if not (path.exists() or str(name_or_path).startswith((".", "/", "~"))):
        path = _hub_snapshot(str(name_or_path))
    return path if path.is_dir() and any(path.glob("*.safetensors")) else None


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:  # noqa: BLE001  huggingface_hub raises many types (offline, not found, gated)
        raise CompressError(f"cannot download {repo_id} to stream it: {str(e).strip().splitlines()[0]}") from None


def choose_streaming(choice: str, model, method: str | None, runtime: bool, parity_scope: str) -> Path | None:
    """The folder to stream the dense model from, or None to load it whole.

    `method` None: any plan (checking an export). "on" insists (a one-line error says why it
    cannot), "off" never streams, "auto" streams when it can and the model is too large for the
    whole-model parity checks (about three float64 copies; see validation.parity.resolve_scope),
    i.e. where only the layer-by-layer check would run anyway. A Hub id is streamed from its
    snapshot in the Hugging Face cache (downloaded only when it is streamed).
    """
    from compress.loading import dense_params, load_config
    from validation.parity import resolve_scope

    if choice == "off":
        return None
    why = (f"method {method!r} needs the whole model in memory" if method and not METHODS[method].streamable
           else "run-time pruning (--runtime) needs the whole model" if runtime
           else "--parity-scope model runs the whole model" if parity_scope == "model" else None)
    if choice == "auto" and (why or resolve_scope("auto", dense_params(load_config(model))) != "layers"):
        return None
    folder = None if why else streamable_folder(model)
    why = why or (None if folder else "the model is not a GGUF file nor a local folder or Hub repository "
                                      "of safetensors")
    if why:
        if choice == "on":
            raise CompressError(f"--streaming on: {why}")
        return None
    return folder


class DenseStream:
    """A dense checkpoint whose decoder layers are read from disk on demand (`layer(i)`).

    The model object is the transformers model built on the meta device, so adapters,
    hooks and the methods see the usual modules; outside `layer(i)` a layer holds no memory.
    """

    def __init__(self, folder: str | Path, dtype: torch.dtype = torch.float32, device="cpu"):
        from transformers import AutoConfig, AutoModelForCausalLM

        from compress.memory import release_large_blocks

        release_large_blocks()
        self.source, self.dtype, self.device = Path(folder), dtype, torch.device(device)
        self.folder = self.source
        if self.source.suffix.lower() == ".gguf":
            self.folder = self._from_gguf()
        config = AutoConfig.from_pretrained(self.folder)
        self.adapter = get_adapter(config)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        if (self.folder / "generation_config.json").is_file():  # as from_pretrained reads it
            from transformers import GenerationConfig

            self.model.generation_config = GenerationConfig.from_pretrained(self.folder)
        self.files = self._weight_files()
        self._real_rotary()
        names = {m: n for n, m in self.model.named_modules()}
        self.prefixes = [names[layer] + "." for layer in self.adapter.layers(self.model)]
        in_layers = tuple(self.prefixes)
        shared = [n for n, _ in self.model.named_parameters() if not n.startswith(in_layers)]
        self._load(self.model, shared)
        if config.tie_word_embeddings:
            self.model.get_output_embeddings().weight = self.model.get_input_embeddings().weight
        left = [n for n, t in self.model.named_buffers() if t.is_meta and not n.startswith(in_layers)]
        if left:
            raise CompressError(f"cannot stream {self.folder}: buffers {left[:3]} are not in the checkpoint; "
                                "use --streaming off")

    def _from_gguf(self) -> Path:
        """The GGUF file's weights rewritten as safetensors in the stream's dtype, in a temporary
        folder under $TMPDIR that goes with this stream (a 7B model takes 13.5 GB there in bfloat16)."""
        import tempfile
        import weakref

        from compress.gguf_folder import gguf_to_folder

        tmp = tempfile.TemporaryDirectory(prefix="compress-gguf-")
        weakref.finalize(self, tmp.cleanup)
        gguf_to_folder(self.source, tmp.name, self.dtype)
        return Path(tmp.name)

    def _weight_files(self) -> dict[str, Path]:
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            return {k: self.folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        files = {}
        for path in sorted(self.folder.glob("*.safetensors")):
            with open_safetensors(path) as f:
                files.update(dict.fromkeys(f.keys(), path))
        return files

    def _real_rotary(self) -> None:
        """Rotary tables are computed, not stored: build the rotary module for real."""
        rotary = self.adapter.rotary_module(self.model)
        if rotary is None:
            return
        path = next(n for n, m in self.model.named_modules() if m is rotary)
        parent, _, leaf = path.rpartition(".")
        with torch.device(self.device):
            setattr(self.model.get_submodule(parent), leaf, type(rotary)(config=self.model.config))

    def _key(self, name: str) -> str:
        prefix = getattr(self.model, "base_model_prefix", "") + "."
        for key in (name, name.removeprefix(prefix)):  # some checkpoints omit the base model's prefix
            if key in self.files:
                return key
        raise CompressError(f"{self.folder}: tensor {name} is not in the checkpoint; use --streaming off")

    def _load(self, root: nn.Module, names: list[str], prefix: str = "") -> None:
        """Read the tensors `names` (relative to `root`) into `root` as parameters, in the stream's dtype."""
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[self._key(prefix + n)], []).append(n)
        for path, group in by_file.items():
            with open_safetensors(path) as f:
                for n in group:
                    t = f.get_tensor(self._key(prefix + n))
                    t = t.to(self.device, self.dtype if t.is_floating_point() else t.dtype)
                    owner, _, leaf = n.rpartition(".")
                    root.get_submodule(owner)._parameters[leaf] = nn.Parameter(t, requires_grad=False)

    @property
    def num_layers(self) -> int:
        return len(self.prefixes)

    @contextmanager
    def layer(self, i: int) -> Iterator[nn.Module]:
        """Decoder layer i with its weights read from disk; back on the meta device afterwards."""
        layer = self.adapter.layers(self.model)[i]
        self._load(layer, [n for n, _ in layer.named_parameters()], self.prefixes[i])
        try:
            yield layer
        finally:
            layer.to("meta")

    def digests(self, module: nn.Module, prefix: str = "") -> dict[str, bytes]:
        """`tensor_digest` of a module's tensors under their model names (for the plan's fingerprint)."""
        return {prefix + n: tensor_digest(prefix + n, t) for n, t in module.state_dict().items() if not t.is_meta}


class StreamedPrune(NamedTuple):
    """What `export_streamed` needs from pruning: the result (its rewritten tensors still to come,
    layer by layer), each layer's input statistics and the method that rewrites them."""

    result: PruneResult
    stats: list
    method: ScoredMethod


@contextmanager
def _activations(stream: DenseStream, calib: torch.Tensor | None) -> Iterator:
    """A folder for the hidden states of `calib` when two layer boundaries' worth of them (a
    layer's input and output) would take more than a quarter of the available memory, else None
    (kept in memory). The folder is a temporary one (under $TMPDIR: point it at a disk with room)."""
    import tempfile

    from compress.memory import spill_needed

    size = 0 if calib is None else 2 * calib.numel() * stream.model.config.hidden_size * stream.dtype.itemsize
    if not spill_needed(size):
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="compress-activations-") as folder:
        print(f"calibration activations ({size / 2**30:.1f} GiB at two layer boundaries) kept on disk in {folder}")
        yield Path(folder)


def prune_streamed(stream: DenseStream, method: str, ratio: float, calib: torch.Tensor | None, seed: int = 0,
                   **settings) -> StreamedPrune:
    """`compress.pipeline.prune` for a streamed model (score-based methods only)."""
    from compress.calibration import layer_input_stats, layer_inputs
    from compress.pipeline import check_ratio, record

    check_ratio(ratio)
    if method not in METHODS:
        raise CompressError(f"unknown method {method!r}; choose from {', '.join(sorted(METHODS))}")
    m = METHODS[method](**settings)
    if not m.streamable:
        raise CompressError(f"method {method!r} needs the whole model in memory; use --streaming off")
    model, adapter = stream.model, stream.adapter
    torch.manual_seed(seed)
    digests = stream.digests(model)
    heads, mlps, stats = [], [], []
    with _activations(stream, calib if m.stats_parts else None) as spill:
        inputs = layer_inputs(model, adapter, calib, m.settings["calib_batch_size"], spill) if m.stats_parts else None
        for i in tqdm(range(stream.num_layers), desc="scoring layers", unit="layer", dynamic_ncols=True):
            with stream.layer(i) as layer, torch.no_grad():
                digests.update(stream.digests(layer, stream.prefixes[i]))
                s = None
                if m.stats_parts:
                    s, inputs = layer_input_stats(adapter, layer, inputs, m.stats_parts, spill)
                h, mlp = m.layer_scores(adapter, layer, s)
            heads.append(h)
            mlps.append(mlp)
            stats.append(s)
        del inputs  # the last boundary's files go before their folder
    g = adapter.geometry()
    result = PruneResult(m.select_plan(g, torch.stack(heads), torch.stack(mlps), ratio, seed))
    record(result.plan, model_identity(model, g, digests), method, ratio, m, seed)
    return StreamedPrune(result, stats, m)


def export_streamed(stream: DenseStream, pruned: StreamedPrune, out: str | Path, *,
                    tokenizer=None, calib: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                    overwrite: bool = False, check: bool = True, max_shard_size: str | int = "2GB",
                    comparison=None, extra: dict | None = None) -> dict:
    """`compress.pipeline.export` for a streamed model: the same folder, one layer in memory at a time.

    Parity is the layer-by-layer check (there is no whole model to run); a `comparison`
    (validation.quality.LayerwiseComparison on held-out text) gives the report's perplexity and
    KL, computed beside the export.
    """
    import time

    from compress.slimming import slim_config, slim_layer_state_dict, slim_shared_state_dict
    from exporters.hf_folder import REPLACED_FILE, ShardWriter, staged_folder, write_model_files
    from safetensors.torch import save_file
    from validation.parity import TOLERANCES, Check, LayerChecker, raise_on_failure
    from validation.report import build_report, write_report

    result, stats, method = pruned
    model, adapter, plan = stream.model, stream.adapter, result.plan
    plan.check(adapter.geometry())
    replaced = result.replaced
    ids = calib if calib is not None else torch.randint(0, model.config.vocab_size, (3, 48),
                                                        generator=torch.Generator().manual_seed(0))
    cast = (lambda t: t.to(dtype) if dtype is not None and t.is_floating_point() else t)  # noqa: E731
    t0 = time.perf_counter()
    checker = LayerChecker(model, adapter, plan, ids) if check else None
    compare = comparison
    shapes: dict[str, torch.Tensor] = {}
    with staged_folder(out, overwrite=overwrite) as folder:
        writer = ShardWriter(folder, max_shard_size, verify=True)

        def write(name: str, t: torch.Tensor) -> None:
            t = cast(t.contiguous())
            shapes[name] = torch.empty(t.shape, dtype=t.dtype, device="meta")
            writer.add(name, t)

        shared = slim_shared_state_dict(model, adapter, replaced)
        for k, v in shared.items():
            write(k, v)
        for i in tqdm(range(stream.num_layers), desc="slimming layers", unit="layer", dynamic_ncols=True):
            with stream.layer(i) as layer, torch.no_grad():
                prefix = stream.prefixes[i]
                own = method.layer_replaced(adapter, layer, prefix, plan.layers[i], stats[i])
                replaced.update(own)
                sd = slim_layer_state_dict(model, adapter, plan, i, replaced)
                if checker is not None:
                    checker.step(i, layer, own, sd, prefix)
                if compare is not None:
                    compare.step(i, layer, sd, slim_config(model, adapter, plan, own))
                for k, v in sd.items():
                    write(f"model.layers.{i}.{k}", v)
        checks = []
        if checker is not None:
            checks = [checker.finish(shared)]
            print("  parity " + checks[0].line())
            raise_on_failure(checks)
        extra = {**(extra or {}), "parity_scope": "layers", "streamed": True,
                 "parity_seconds": round(time.perf_counter() - t0, 2)}
        quality = compare.finish(shared) if compare is not None else {}
        total = writer.close()
        name = str(shapes["model.embed_tokens.weight"].dtype).removeprefix("torch.")
        files = Check("files", "cpu", name, float("inf") if writer.problem else 0.0, TOLERANCES["float64"],
                      writer.problem is None, writer.problem or "every shard read back equal to the layer-checked "
                      "slim tensors (model not run: streamed export)")
        print("  parity " + files.line())
        raise_on_failure([files])
        config = slim_config(model, adapter, plan, replaced)
        config.dtype = name
        report = build_report(model, adapter, plan, shapes, checks + [files], TOLERANCES, quality=quality,
                              extra=extra)
        report["files"]["slim_weight_bytes"] = total
        write_model_files(folder, config, tokenizer, getattr(model, "generation_config", None))
        plan.save(folder / "plan.json")
        if replaced:
            save_file({k: v.detach().cpu().contiguous() for k, v in replaced.items()}, str(folder / REPLACED_FILE))
        write_report(folder, report)
    return report


def validate_streamed(stream: DenseStream, plan, replaced: dict, folder: str | Path, dtype: torch.dtype,
                      ids: torch.Tensor) -> list:
    """`compress validate`'s checks with the dense model streamed, in one pass over its layers: per
    layer the folder's tensors == the slim tensors the plan gives (read one at a time) and the slim
    layer == the masked dense layer in float64, the weights' fingerprint collected on the way.
    Returns the files and layers checks; a plan made for another model raises PlanMismatchError."""
    from compress.slimming import slim_layer_state_dict, slim_shared_state_dict
    from exporters.hf_folder import tensors_differ, weight_map
    from validation.parity import TOLERANCES, Check, LayerChecker

    folder = Path(folder)
    model, adapter = stream.model, stream.adapter
    g = adapter.geometry()
    names = weight_map(folder)
    # architecture and shapes now (a wrong-shaped model would fail obscurely); the weights' fingerprint below
    plan.check_identity({**model_identity(model, g, {}), "fingerprint": plan.base.get("fingerprint")})

    def differs(sd: dict[str, torch.Tensor], prefix: str) -> str | None:
        return tensors_differ(folder, names, {prefix + k: v.to(dtype) if v.is_floating_point() else v
                                              for k, v in sd.items()})

    checker = LayerChecker(model, adapter, plan, ids)
    digests = stream.digests(model)
    shared = slim_shared_state_dict(model, adapter, replaced)
    problem, seen = differs(shared, ""), set(shared)
    for i in tqdm(range(stream.num_layers), desc="checking layers", unit="layer", dynamic_ncols=True):
        with stream.layer(i) as layer, torch.no_grad():
            prefix = stream.prefixes[i]
            digests.update(stream.digests(layer, prefix))
            sd = slim_layer_state_dict(model, adapter, plan, i, replaced)
            problem = problem or differs(sd, f"model.layers.{i}.")
            seen.update(f"model.layers.{i}.{k}" for k in sd)
            checker.step(i, layer, {k: v for k, v in replaced.items() if k.startswith(prefix)}, sd, prefix)
    plan.check_identity(model_identity(model, g, digests))
    print(f"plan matches {stream.source} ({plan.base.get('fingerprint')})")
    extra = sorted(set(names) - seen)
    problem = problem or (f"the folder holds tensors the plan does not give: {extra[:3]}" if extra else None)
    name = str(dtype).removeprefix("torch.")
    files = Check("files", "cpu", name, float("inf") if problem else 0.0, TOLERANCES["float64"], problem is None,
                  problem or "every tensor identical to the layer-checked slim tensors (model not run: streamed)")
    return [files, checker.finish(shared)]
