"""Where the pipeline's dense model comes from: a source of decoder layers, in order.

`LayerSource` is a model held whole in memory; `DenseStream` is a checkpoint (a safetensors
folder, a Hub snapshot in the Hugging Face cache, or a GGUF file rewritten as safetensors by
`compress.gguf_folder`) whose decoder layers are read from disk one at a time, on their turn,
and released after: only the embeddings, final norm and LM head are held. `prune` and `export`
(compress.pipeline) and `compress validate`'s checks run the same steps over either; streaming is
a property of the source. Peak memory of a streamed run is the shared tensors, one layer and the
calibration windows' hidden states at two layer boundaries (on disk when they would take over a
quarter of the memory: `spill_folder`), so a 7B bfloat16 checkpoint exports on a 24 GiB machine.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.adapters import get_adapter
from compress.errors import CompressError
from compress.helpers import is_hub_id
from compress.plan import model_identity, tensor_digest
from exporters.hf_folder import open_safetensors

__all__ = ["LayerSource", "DenseStream", "as_source", "open_source", "streamable_folder", "choose_streaming",
           "spill_folder"]

# What a streamed Hub model needs from its repository (the tokenizer is loaded on its own).
HUB_FILES = ["*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json"]


class LayerSource:
    """A dense causal LM held whole in memory, seen as its decoder layers in order: what the
    pipeline runs over. `DenseStream` reads the layers from disk instead."""

    streamed = False

    def __init__(self, model: nn.Module):
        self.model, self.adapter = model, get_adapter(model.config)
        self.dtype = next(model.parameters()).dtype
        names = {m: n for n, m in model.named_modules()}
        self.prefixes = [names[layer] + "." for layer in self.adapter.layers(model)]  # "model.layers.3."

    @property
    def num_layers(self) -> int:
        return len(self.prefixes)

    @contextmanager
    def layer(self, i: int) -> Iterator[nn.Module]:
        """Decoder layer i, its weights in memory while the block runs."""
        yield self.adapter.layers(self.model)[i]

    def layers(self, desc: str) -> Iterator[tuple[int, nn.Module]]:
        """(i, decoder layer i) for every layer in order, with a progress bar (`layer`)."""
        for i in tqdm(range(self.num_layers), desc=desc, unit="layer", dynamic_ncols=True):
            with self.layer(i) as layer:
                yield i, layer

    def identity(self) -> dict:
        """`model_identity` of the dense model, the one a plan must carry."""
        return model_identity(self.model, self.adapter.geometry())


def as_source(model) -> LayerSource:
    """A source as it is; a model (what `prune(model, ...)` has always taken) as held in memory."""
    return model if isinstance(model, LayerSource) else LayerSource(model)


def open_source(model, folder: Path | None, load_dtype: str, export_dtype: torch.dtype, device) -> LayerSource:
    """The dense model `model` (folder, Hub id or GGUF file; None: the reference model) streamed from
    `folder` (`choose_streaming`'s answer), or loaded whole where that is None; held in the dtype
    `load_dtype` ("auto": `compress.loading.load_dtype`'s choice) on `device`."""
    from compress.loading import load_config, load_dtype as held_dtype, load_model

    if folder is None:
        return LayerSource(load_model(model, dtype=load_dtype, device=device, export_dtype=export_dtype))
    return DenseStream(folder, held_dtype(load_config(folder), load_dtype, export_dtype), device)


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
    if is_hub_id(name_or_path):
        path = _hub_snapshot(str(name_or_path))
    return path if path.is_dir() and any(path.glob("*.safetensors")) else None


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:  # noqa: BLE001  huggingface_hub raises many types (offline, not found, gated)
        raise CompressError(f"cannot download {repo_id} to stream it: {str(e).strip().splitlines()[0]}") from None


def choose_streaming(choice: str, model, why_whole: str | None, fits_whole: Callable[[int], bool]) -> Path | None:
    """The folder to stream the dense model from, or None to load it whole.

    `why_whole`: why this run needs the whole model in memory, or None; `fits_whole(parameters)`:
    whether a model that large fits the whole-model parity checks. "on" insists (a one-line error
    says why it cannot), "off" never streams, "auto" streams when it can and the model does not
    fit them, i.e. where only the layer-by-layer check would run anyway. A Hub id is streamed
    from its snapshot in the Hugging Face cache (downloaded only when it is streamed).
    """
    from compress.loading import dense_params, load_config

    if choice == "off" or (choice == "auto" and (why_whole or fits_whole(dense_params(load_config(model))))):
        return None
    folder = None if why_whole else streamable_folder(model)
    why = why_whole or (None if folder else "the model is not a GGUF file nor a local folder or Hub repository "
                                            "of safetensors")
    if why and choice == "on":
        raise CompressError(f"--streaming on: {why}")
    return None if why else folder


class DenseStream(LayerSource):
    """A dense checkpoint whose decoder layers are read from disk on demand (`layer(i)`).

    The model object is the transformers model built on the meta device, so adapters, hooks and
    the methods see the usual modules; outside `layer(i)` a layer holds no memory. The weights'
    fingerprint (`identity`) is taken as the layers are read.
    """

    streamed = True

    def __init__(self, folder: str | Path, dtype: torch.dtype = torch.float32, device="cpu"):
        from transformers import AutoConfig, AutoModelForCausalLM

        from compress.memory import release_large_blocks

        release_large_blocks()
        self.source, self.device = Path(folder), torch.device(device)
        self.folder = self._from_gguf(dtype) if self.source.suffix.lower() == ".gguf" else self.source
        config = AutoConfig.from_pretrained(self.folder)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        super().__init__(model)
        if (self.folder / "generation_config.json").is_file():  # as from_pretrained reads it
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(self.folder)
        self.files = self._weight_files()
        self._real_rotary()
        in_layers = tuple(self.prefixes)
        self._load(model, [n for n, _ in model.named_parameters() if not n.startswith(in_layers)])
        if config.tie_word_embeddings:
            model.get_output_embeddings().weight = model.get_input_embeddings().weight
        left = [n for n, t in model.named_buffers() if t.is_meta and not n.startswith(in_layers)]
        if left:
            raise CompressError(f"cannot stream {self.folder}: buffers {left[:3]} are not in the checkpoint; "
                                "use --streaming off")
        self.digests, self.read = self._digests(model), set()

    def _from_gguf(self, dtype: torch.dtype) -> Path:
        """The GGUF file's weights rewritten as safetensors in the stream's dtype, in a temporary
        folder under $TMPDIR that goes with this stream (a 7B model takes 13.5 GB there in bfloat16)."""
        import tempfile
        import weakref

        from compress.gguf_folder import gguf_to_folder

        tmp = tempfile.TemporaryDirectory(prefix="compress-gguf-")
        weakref.finalize(self, tmp.cleanup)
        gguf_to_folder(self.source, tmp.name, dtype)
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

    @contextmanager
    def layer(self, i: int) -> Iterator[nn.Module]:
        """Decoder layer i with its weights read from disk; back on the meta device afterwards."""
        layer = self.adapter.layers(self.model)[i]
        self._load(layer, [n for n, _ in layer.named_parameters()], self.prefixes[i])
        self.digests.update(self._digests(layer, self.prefixes[i]))
        self.read.add(i)
        try:
            yield layer
        finally:
            layer.to("meta")

    @staticmethod
    def _digests(module: nn.Module, prefix: str = "") -> dict[str, bytes]:
        """`tensor_digest` of a module's tensors in memory, under their model names."""
        return {prefix + n: tensor_digest(prefix + n, t) for n, t in module.state_dict().items() if not t.is_meta}

    def identity(self) -> dict:
        """`model_identity` from the digests taken as each layer was read: after a pass over them all."""
        if len(self.read) < self.num_layers:
            raise RuntimeError(f"{self.source}: the fingerprint needs every layer read first "
                               f"({len(self.read)} of {self.num_layers})")
        return model_identity(self.model, self.adapter.geometry(), self.digests)


@contextmanager
def spill_folder(source: LayerSource, calib: torch.Tensor | None) -> Iterator[Path | None]:
    """A folder for the hidden states of `calib` when two layer boundaries' worth of them (a
    layer's input and output) would take more than a quarter of the available memory, else None
    (kept in memory). The folder is a temporary one (under $TMPDIR: point it at a disk with room)."""
    import tempfile

    from compress.memory import spill_needed

    size = 0 if calib is None else 2 * calib.numel() * source.model.config.hidden_size * source.dtype.itemsize
    if not spill_needed(size):
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="compress-activations-") as folder:
        print(f"calibration activations ({size / 2**30:.1f} GiB at two layer boundaries) kept on disk in {folder}")
        yield Path(folder)
