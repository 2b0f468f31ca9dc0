"""Run an exported slim model with onnxruntime: forward with an explicit KV cache, and generate.

Needs only numpy and onnxruntime (transformers only to load a tokenizer by path), so a
deployment does not need torch. The cache layout is read from the graph's inputs: each
`past_key_values.{i}.key|value` is [batch, kv_heads_i, past, head_dim] with its own head count,
and layers without attention simply have no such inputs. `onnx_config.json`, when present beside
the model, adds the special token ids.

On the CUDA execution provider the present tensors stay on the device between steps (I/O
binding) and only the logits come back to the host; on CPU, plain numpy in and out. A fused
graph (GroupQueryAttention, `onnx_config.json` says "graph": "fused") can instead append to
fixed-size buffers in place (`SharedCache`: the present outputs are bound to the past inputs),
so a decode step copies no cache at all; `generate` does that on CPU.

A Probe Pruning export has a second graph, `prefill.onnx`, which runs the first step and also
returns each probed sublayer's chosen indices and the weight rows/columns it gathered for them;
`model.onnx` takes those gathered tensors on every later step (so a decode step reads only the
kept weights), and the runner carries them after the KV tensors, exactly like the cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compress.helpers import ONNX_TYPES, positions
from compress.onnxruntime_import import ort
from compress.threads import chosen_threads

__all__ = ["OnnxRunner", "Generation", "SharedCache", "default_providers"]

PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."
_NP_DTYPES = {ort_type: np.dtype(name).type for name, (_, ort_type) in ONNX_TYPES.items()}
_NP_INPUT_TYPES = {**_NP_DTYPES, "tensor(int64)": np.int64}


def default_providers() -> list[str]:
    """CUDA (from onnxruntime-gpu) when this onnxruntime has it, CPU always as the fallback."""
    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


def _session_options() -> ort.SessionOptions:
    """onnxruntime's defaults, except under a command: the thread count it chose for torch
    (`compress.threads`), not onnxruntime's own one thread per core, which a busy core slows down."""
    options = ort.SessionOptions()
    if chosen_threads():
        options.intra_op_num_threads, options.inter_op_num_threads = chosen_threads(), 1
    return options


@dataclass
class SharedCache:
    """KV buffers of a fixed capacity [batch, kv_heads, capacity, head_dim], numpy, in past order,
    that a fused graph updates in place; `length` tokens (padding included) are written."""

    buffers: list[np.ndarray]
    length: int = 0
    binding: object = None  # the I/O binding of the buffers, made on the first step and kept

    @property
    def capacity(self) -> int:
        return self.buffers[0].shape[2] if self.buffers else 0


@dataclass
class Generation:
    ids: np.ndarray  # [batch, prompt + new] int64, prompt (with its left padding) included
    prompt_length: int
    text: list[str] | None = None  # the new tokens decoded, when the runner has a tokenizer

    @property
    def new_ids(self) -> np.ndarray:
        return self.ids[:, self.prompt_length:]


class OnnxRunner:
    """An onnxruntime session over `model.onnx` (a folder holding it, or the file itself)."""

    def __init__(self, model_dir_or_onnx_path: str | Path, providers: list | None = None, tokenizer=None,
                 session_options: ort.SessionOptions | None = None):
        path = Path(model_dir_or_onnx_path)
        model_path = path / "model.onnx" if path.is_dir() else path
        config_path = model_path.with_name("onnx_config.json")
        self.config = json.loads(config_path.read_text()) if config_path.exists() else {}
        session_options = session_options or _session_options()
        self.session = ort.InferenceSession(str(model_path), sess_options=session_options,
                                            providers=providers or default_providers())
        # Probe Pruning: a prefill graph chooses each probed sublayer's heads/channels; the step
        # graph takes those indices on every later step, carried like the KV cache.
        probe = self.config.get("probe") or {}
        self.probe_index_names = list(probe.get("indices", []))  # the prefill's choice (carried, not fed)
        self.probe_names = list(probe.get("gathered", []))  # what each later step takes
        self.input_types = {i.name: _NP_INPUT_TYPES[i.type] for i in self.session.get_inputs()}
        self.prefill = None if not probe else ort.InferenceSession(
            str(model_path.with_name(probe["prefill"])), sess_options=session_options,
            providers=providers or default_providers())
        self.provider = self.session.get_providers()[0]
        self.on_device = self.provider == "CUDAExecutionProvider"
        options = self.session.get_provider_options().get(self.provider, {})
        self.device_id = int(options.get("device_id", 0))

        past = [i for i in self.session.get_inputs() if i.name.startswith(PAST_PREFIX)]
        self.past_names = [i.name for i in past]
        self.present_names = [o.name for o in self.session.get_outputs() if o.name.startswith(PRESENT_PREFIX)]
        self.kv_heads = [i.shape[1] for i in past]  # static per layer, may differ
        self.head_dim = past[0].shape[3] if past else self.config.get("head_dim", 0)
        logits = self.session.get_outputs()[0]
        self.logits_name, self.vocab_size = logits.name, logits.shape[-1]
        self.dtype = _NP_DTYPES[past[0].type if past else logits.type]
        self.dtype_name = np.dtype(self.dtype).name
        self.tokenizer = _load_tokenizer(tokenizer)

    # --- one step ---------------------------------------------------------------------------
    def empty_past(self, batch: int) -> list[np.ndarray]:
        """A zero-length cache, flat in `past_names` order."""
        return [np.zeros((batch, h, 0, self.head_dim), dtype=self.dtype) for h in self.kv_heads]

    @property
    def shares_cache(self) -> bool:
        """Whether `generate` appends to a SharedCache: a fused graph on CPU."""
        return self.config.get("graph") == "fused" and not self.on_device and self.prefill is None

    def shared_cache(self, batch: int, capacity: int) -> SharedCache:
        """Empty buffers for `capacity` tokens (prompt, its padding and new tokens): pass as `past`."""
        return SharedCache([np.zeros((batch, h, capacity, self.head_dim), dtype=self.dtype) for h in self.kv_heads])

    def forward(self, input_ids, attention_mask=None, position_ids=None, past=None):
        """(logits [B, T, V] numpy, present): present is flat in `present_names` order (then, for
        Probe Pruning, the prefill's chosen indices), numpy on CPU and OrtValues on the device
        under CUDA; pass it back as `past` for the next step. `past=None` is an empty cache
        (prefill); a missing mask means no padding. `past` may also be a `SharedCache` (fused graphs):
        the graph then appends to its buffers in place, and it is returned as the present."""
        ids = np.asarray(input_ids, dtype=np.int64)
        ids = ids[None] if ids.ndim == 1 else ids
        B, T = ids.shape
        if isinstance(past, SharedCache):
            return self._run_shared(ids, attention_mask, position_ids, past), past
        prefill = past is None and self.prefill is not None
        past = ([] if prefill else self.empty_past(B)) if past is None else list(past)
        if attention_mask is None:
            attention_mask = np.ones((B, _length(past[0]) + T if past and self.past_names else T), dtype=np.int64)
        mask = np.asarray(attention_mask, dtype=np.int64)
        if position_ids is None:
            position_ids = positions(mask)[:, mask.shape[1] - T:]
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": np.asarray(position_ids, dtype=np.int64)}
        session = self.prefill if prefill else self.session
        n, skip = len(self.past_names), len(self.probe_index_names)
        carried = [] if prefill else list(zip(self.past_names, past[:n])) + list(zip(self.probe_names, past[n + skip:]))
        if self.on_device:
            logits, present = self._run_bound(session, feeds, carried)
        else:
            feeds.update(carried)
            logits, *present = session.run(None, feeds)
        if not prefill and self.probe_names:  # the prefill's choice goes on to the next step
            present += past[n:]
        return logits, present

    def _run_shared(self, ids, attention_mask, position_ids, cache: SharedCache) -> np.ndarray:
        """One step over buffers the graph writes in place: present outputs bound to the past inputs."""
        T = ids.shape[1]
        if self.config.get("graph") != "fused":
            raise ValueError("shared KV buffers need a fused graph (GroupQueryAttention); this one grows its cache")
        if cache.length + T > cache.capacity:
            raise ValueError(f"the shared KV cache holds {cache.capacity} tokens; {cache.length + T} needed")
        mask = (np.ones((ids.shape[0], cache.length + T), dtype=np.int64) if attention_mask is None
                else np.asarray(attention_mask, dtype=np.int64))
        if mask.shape[1] != cache.length + T:
            raise ValueError(f"attention_mask covers {mask.shape[1]} tokens; the cache has {cache.length} + {T} new")
        pos = positions(mask)[:, -T:] if position_ids is None else np.asarray(position_ids, dtype=np.int64)
        if cache.binding is None:
            cache.binding = binding = self.session.io_binding()
            for past, present, buffer in zip(self.past_names, self.present_names, cache.buffers):
                value = ort.OrtValue.ortvalue_from_numpy(buffer)  # shares the numpy memory
                binding.bind_ortvalue_input(past, value)
                binding.bind_ortvalue_output(present, value)
        binding = cache.binding
        for name, value in (("input_ids", ids), ("attention_mask", mask), ("position_ids", pos)):
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        # The logits go straight into a new array: reading them back through binding.get_outputs()
        # wraps every KV output too, a quarter of a millisecond per step for 30 layers.
        logits = np.empty((ids.shape[0], T, self.vocab_size), dtype=self.dtype)
        binding.bind_ortvalue_output(self.logits_name, ort.OrtValue.ortvalue_from_numpy(logits))
        self.session.run_with_iobinding(binding)
        cache.length += T
        return logits

    def _run_bound(self, session, feeds: dict, carried: list):
        """CUDA: KV tensors (and chosen indices) stay on the device; only logits are copied back."""
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name, value in carried:
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value, dtype=self.input_types[name]))
        outputs = [o.name for o in session.get_outputs()]
        binding.bind_output(outputs[0], "cpu")
        for name in outputs[1:]:
            binding.bind_output(name, "cuda", self.device_id)
        session.run_with_iobinding(binding)
        logits, *present = binding.get_outputs()
        return logits.numpy(), present

    # --- generation -------------------------------------------------------------------------
    def generate(self, prompt, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None, attention_mask=None,
                 eos_token_id: int | list[int] | None | str = "config") -> Generation:
        """Prefill, then one token per step with the KV cache. `prompt`: text, a list of texts
        (left-padded), or token ids [T] / [B, T]. Stops early once every row has produced EOS
        (rows that finished first are filled with the pad id). `eos_token_id`: "config" takes it
        from onnx_config.json, None never stops."""
        ids, mask = self._encode(prompt, attention_mask)
        eos = self.config.get("eos_token_id") if isinstance(eos_token_id, str) else eos_token_id
        eos = np.asarray([] if eos is None else np.atleast_1d(eos), dtype=np.int64)
        pad = self.config.get("pad_token_id")
        pad = pad if pad is not None else (int(eos[0]) if eos.size else 0)
        rng = np.random.default_rng(seed)
        past = self.shared_cache(ids.shape[0], ids.shape[1] + max_new_tokens) if self.shares_cache else None
        logits, past = self.forward(ids, mask, past=past)
        pos = positions(mask)[:, -1:]
        done = np.zeros(ids.shape[0], dtype=bool)
        new = []
        for step in range(max_new_tokens):
            nxt = _pick(logits[:, -1], do_sample, temperature, top_k, top_p, rng)
            nxt = np.where(done, pad, nxt)
            new.append(nxt)
            done |= (nxt[:, None] == eos).any(-1)  # not np.isin: 10x its cost on a few ids
            if done.all() or step == max_new_tokens - 1:
                break
            mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)
            pos = pos + 1
            logits, past = self.forward(nxt[:, None], mask, pos, past)
        out = np.concatenate([ids, np.stack(new, axis=1)], axis=1) if new else ids
        result = Generation(out, ids.shape[1])
        if self.tokenizer is not None:
            result.text = [self.tokenizer.decode(_until_eos(row, eos).tolist(), skip_special_tokens=True)
                           for row in result.new_ids]
        return result

    def _encode(self, prompt, attention_mask) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer: OnnxRunner(..., tokenizer=...)")
            rows = [_token_ids(self.tokenizer, text) for text in prompt]
            width = max(len(r) for r in rows)
            pad = self.config.get("pad_token_id") or self.config.get("eos_token_id") or 0
            pad = int(np.atleast_1d(pad)[0])
            ids = np.array([[pad] * (width - len(r)) + r for r in rows], dtype=np.int64)
            mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=np.int64)
            return ids, mask
        ids = np.asarray(prompt, dtype=np.int64)
        ids = ids[None] if ids.ndim == 1 else ids
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        return ids, mask.reshape(ids.shape)


def _length(t) -> int:
    return (t.shape() if isinstance(t, ort.OrtValue) else t.shape)[2]


def _pick(logits: np.ndarray, do_sample: bool, temperature: float, top_k: int, top_p: float, rng) -> np.ndarray:
    """Greedy, or temperature / top-k / top-p (nucleus) sampling, one token per row."""
    if not do_sample:
        return logits.argmax(-1).astype(np.int64)
    x = logits.astype(np.float64) / max(temperature, 1e-6)
    if 0 < top_k < x.shape[-1]:
        kth = np.partition(x, -top_k, axis=-1)[:, -top_k:].min(-1, keepdims=True)
        x = np.where(x < kth, -np.inf, x)
    if top_p < 1.0:
        order = np.argsort(-x, axis=-1)
        p = _softmax(np.take_along_axis(x, order, axis=-1))
        drop = np.cumsum(p, axis=-1) - p > top_p  # keep the smallest prefix reaching top_p
        np.put_along_axis(x, order, np.where(drop, -np.inf, np.take_along_axis(x, order, axis=-1)), axis=-1)
    p = _softmax(x)
    u = rng.random((x.shape[0], 1))
    return np.minimum((np.cumsum(p, axis=-1) < u).sum(-1), x.shape[-1] - 1).astype(np.int64)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _until_eos(row: np.ndarray, eos: np.ndarray) -> np.ndarray:
    hits = np.nonzero(np.isin(row, eos))[0]
    return row[: hits[0]] if hits.size else row


def _token_ids(tokenizer, text: str) -> list[int]:
    enc = tokenizer.encode(text)
    return list(getattr(enc, "ids", enc))  # `tokenizers.Tokenizer` gives an Encoding


def _load_tokenizer(tokenizer):
    if tokenizer is None or not isinstance(tokenizer, (str, Path)):
        return tokenizer
    from transformers import AutoTokenizer

    # A slim folder's tokenizer needs no remote code; without this, transformers 5 would ask
    # about the model code its config.json names.
    return AutoTokenizer.from_pretrained(str(tokenizer), trust_remote_code=False)
