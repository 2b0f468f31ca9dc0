"""DISP's training memory, planned before any weight is read (`compress export --dry-run`).

A training step keeps, until its backward, every tensor autograd saved during the forward through
the masked model. That is measured, not guessed: a two-layer model of the same widths (random
weights, on the CPU) runs the step's forward at three sequence lengths with a saved-tensor hook
counting the bytes (each storage once, the frozen weights not at all), split into the
hypernetwork's (masks; they grow with depth, not length), each decoder layer's, and the rest
(embedding, final norm, LM head, loss), the last two each fitted as c + a T + b T^2
per sequence (attention may keep T x T scores; c does not grow with the batch). The
first layer saves less (its input needs no gradient), so a two-layer copy is measured and its
second layer stands for the others. The plan scales that to the model's depth, batch and sequence
length:

- without checkpointing (CPU): every layer's saved tensors at once;
- with checkpointing (CUDA: each decoder layer recomputed in backward): each layer's input,
  plus one layer's saved tensors while it is recomputed.

Figures are for float32 activations (the CPU's); CUDA's bf16 autocast holds most of them in
half the bytes, so there they are an upper bound. Backward adds transient gradients: those of
the float32 logits and their log-softmax, and about one layer's activations.

With N processes (`world_size`) each runs its share of the batch. Replicated, each holds the whole
dense model; sharded (FSDP2, compress.sharding), each holds 1/N of all weights plus, whole, the
embedding, final norm and LM head (one unit, gathered for the whole step) and two decoder layers
(the one running and the next, prefetched), each gathered unit twice (FSDP2 gathers into one
buffer and copies out of it into the unit's parameters).
"""

from __future__ import annotations

import copy

import torch

from compress.adapters import get_adapter

__all__ = ["training_memory", "format_plan"]

_T = 32  # measured at _T, 2 * _T and 4 * _T tokens


def _saved_bytes(disp, model, adapter, kinds, seq: int) -> list[int]:
    """Saved-tensor bytes of one sequence of `seq` tokens: [the hypernetwork's (before the model runs),
    the model's outside its layers, layer 0, layer 1, ...]."""
    from compress.methods.disp_hypernet import HyperNetwork
    from compress.training import frozen

    g = adapter.geometry()
    gen = torch.Generator().manual_seed(0)
    hyper = HyperNetwork([w for _ in range(g.num_layers) for _, w in kinds], gen)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, counts, where = set(), [0] * (g.num_layers + 2), [0]

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            counts[where[0]] += storage.nbytes()
        return t

    handles = [model.register_forward_pre_hook(lambda *a: where.__setitem__(0, 1))]
    for i, layer in enumerate(adapter.layers(model)):
        handles += [layer.register_forward_pre_hook(lambda *a, i=i: where.__setitem__(0, i + 2)),
                    layer.register_forward_hook(lambda *a: where.__setitem__(0, 1))]
    ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=gen)
    try:
        with frozen(model), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            disp._masked_loss(model, adapter, hyper, kinds, ids, gen)
    finally:
        for h in handles:
            h.remove()
    return counts


def training_memory(config, dtype: torch.dtype, settings: dict, batch_size: int, seq_len: int,
                    world_size: int = 1) -> dict:
    """Bytes of a DISP training step on a model of `config`, per process of `world_size` (see the
    module docstring); `batch_size` is the global batch."""
    from transformers import AutoModelForCausalLM

    from compress.loading import dense_params
    from compress.methods.disp import DISP, structures

    two = copy.deepcopy(config)  # the first layer saves less (its input needs no gradient): measure the second
    two.num_hidden_layers = 2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(two, dtype=torch.float32).eval()
    adapter = get_adapter(two)
    disp = DISP(**{k: v for k, v in settings.items() if k in DISP.defaults})
    kinds = structures(adapter.geometry(), disp.settings["prune_heads"])
    batch_size = -(-batch_size // world_size)  # this process's share
    lengths = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64) * _T
    measured = torch.tensor([_saved_bytes(disp, model, adapter, kinds, int(n)) for n in lengths], dtype=torch.float64)
    # per sequence: layer(T) = c + a T + b T^2 (attention may keep T x T scores), rest(T) = d + e T;
    # the constants (masks, the hypernetwork's outputs) do not grow with the batch
    basis = torch.stack([lengths ** 0, lengths, lengths ** 2], 1)

    def scaled(column) -> float:
        c, a, b = torch.linalg.solve(basis, column).tolist()
        return max(0.0, c) + batch_size * max(0.0, a * seq_len + b * seq_len ** 2)

    per_layer, first, other = scaled(measured[:, 3]), scaled(measured[:, 2]), scaled(measured[:, 1])
    masks = measured[0, 0].item() / 2 * config.num_hidden_layers  # the hypernetwork's: per layer, any length
    layers = config.num_hidden_layers
    inputs = batch_size * seq_len * config.hidden_size * 4  # a layer's input, float32
    size = torch.tensor([], dtype=dtype).element_size()
    total_params = dense_params(config)
    layer_params = sum(p.numel() for p in adapter.layers(model)[1].parameters())
    rest = total_params - config.num_hidden_layers * layer_params  # embedding, final norm, LM head
    weights = total_params * size
    sharded = (total_params / world_size + 2 * (rest + 2 * layer_params)) * size
    # backward's transient buffers: the gradients of the float32 logits and of their log-softmax,
    # and about one layer's activations
    transient = 2 * batch_size * seq_len * config.vocab_size * 4 + per_layer
    hyper = 4 * 4 * sum(p.numel() for p in _hyper_params(adapter, kinds, layers))  # weights, grads, AdamW m, v
    activations = hyper + masks + other + transient
    plain = activations + first + (layers - 1) * per_layer
    checkpointed = activations + layers * inputs + per_layer
    return {
        "world_size": world_size,
        "weights": weights,
        "sharded_weights": sharded,
        "hypernetwork": hyper + masks,
        "per_layer": per_layer,
        "first_layer": first,
        "head_and_loss": other,
        "backward": transient,
        "plain": weights + plain,
        "checkpointed": weights + checkpointed,
        "plain_fsdp": sharded + plain,
        "checkpointed_fsdp": sharded + checkpointed,
    }


def _hyper_params(adapter, kinds, layers: int):
    from compress.methods.disp_hypernet import HyperNetwork

    return HyperNetwork([w for _ in range(layers) for _, w in kinds], torch.Generator().manual_seed(0)).parameters()


def format_plan(m: dict, name: str, dtype: torch.dtype, batch_size: int, seq_len: int, layers: int) -> list[str]:
    gb, n = 1e9, m["world_size"]
    held = str(dtype).removeprefix("torch.")
    each = "" if n == 1 else f", {-(-batch_size // n)} per process; each of {n} processes"
    sharded = [] if n == 1 else [
        f"  sharded (--shard fsdp): weights held     {m['sharded_weights'] / gb:8.2f} GB  (gather buffers "
        "beyond one copy per unit not counted)",
        f"  sharded step total, all layers saved    {m['plain_fsdp'] / gb:8.2f} GB",
        f"  sharded step total, layers checkpointed {m['checkpointed_fsdp'] / gb:8.2f} GB"]
    return [
        f"DISP training memory for {name} ({layers} layers; batch {batch_size} x {seq_len} tokens{each}):",
        f"  dense weights ({held})                 {m['weights'] / gb:8.2f} GB",
        f"  hypernetwork, its masks and AdamW       {m['hypernetwork'] / gb:8.2f} GB",
        f"  saved activations per layer (float32)   {m['per_layer'] / gb:8.2f} GB",
        f"  embedding, LM head and loss             {m['head_and_loss'] / gb:8.2f} GB",
        f"  backward's transient gradients          {m['backward'] / gb:8.2f} GB",
        f"  step total, all layers saved (CPU)      {m['plain'] / gb:8.2f} GB",
        f"  step total, layers checkpointed (CUDA)  {m['checkpointed'] / gb:8.2f} GB",
        *sharded,
    ]
