"""Parity checks: the slim model against the dense model masked by its plan, each a max |logit
difference| held to a tolerance per dtype (`TOLERANCES`) or a comparison of greedy tokens:

1. equivalence: slim logits == dense model with the plan applied as masks (and rewritten tensors);
2. identity:    a keep-all slim model == the dense model;
3. generation:  32 greedy tokens identical between slim and masked dense (KV cache on both;
                required in float64, reported in half precision);
4. files:       the folder holds exactly the slim tensors, and the model transformers loads from
                it (its own modeling file) == the masked dense model, dense weights rounded to
                the export dtype, both in float64;
5. onnx:        onnxruntime == slim PyTorch, prefill and every decode step (`onnx_parity.onnx_checks`);
6. layers:      each slim decoder layer == its masked dense layer, one layer at a time in float64
                (`layer_equivalence`): what runs instead of 1-4's model runs when float64 copies
                of the whole model do not fit in memory (scope "layers"; "auto" decides);
7. probe-*:     Probe Pruning (`probe_checks`): with every head and channel forced, == masked
                dense (the static model); with a random choice of the probe's counts forced ==
                the dense model masked by that choice as a static plan (the gather path); KV-cache
                greedy == no-cache greedy under the prefill's choice (the decode path);
run on CPU in float64 always and on CUDA in float16 and bfloat16 when a GPU is present.

Why float64 on CPU: in float32 the slim model and the masked dense model differ by summation
order, and that noise grows with depth and logit size (about 1e-2 on a 30-layer model with
|logits| near 40), so any fixed float32 tolerance either raises false alarms on deep models or
hides real mistakes on shallow ones. In float64 a correct plan agrees to about 1e-12 at any
depth, while one wrong index moves logits by orders of magnitude more than the tolerance.
Half precision cannot promise that; its tolerances are bounds on rounding, not proofs.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from compress.adapters import Adapter
from compress.errors import ParityError
from compress.helpers import SCOPES, dtype_name, positions
from compress.masking import mask_layer, masked, plan_masks, replaced_weights
from compress.plan import Plan
from compress.slimming import build_slim_model

__all__ = ["TOLERANCES", "GENERATION_TOKENS", "SCOPES", "Check", "parity_batch", "run_parity", "resolve_scope",
           "equivalence_checks", "layer_equivalence", "LayerChecker", "probe_checks", "check_files",
           "raise_on_failure", "parity_targets"]

# Max |logit difference| allowed, per dtype. float64 (the CPU checks, and the files check of any
# export dtype) leaves room for rounding only; half precisions (CUDA) round every matmul of
# different inner width differently. The ONNX checks' table is onnx_parity.ONNX_TOLERANCES.
TOLERANCES = {
    "float64": 1e-6,
    "float16": 2e-2,
    "bfloat16": 1.5e-1,
}
GENERATION_TOKENS = 32


@dataclass
class Check:
    name: str
    device: str
    dtype: str
    max_abs_diff: float
    tolerance: float
    passed: bool
    detail: str = ""

    def line(self) -> str:
        mark = "ok  " if self.passed else "FAIL"
        return (f"{mark} {self.name:<12} {self.device:<5} {self.dtype:<9} max|diff| {self.max_abs_diff:.2e}"
                f" (tol {self.tolerance:.0e}){'  ' + self.detail if self.detail else ''}")

    def to_dict(self) -> dict:
        return asdict(self)


def parity_targets() -> list[tuple[str, torch.dtype]]:
    """(device, dtype) pairs to check on this machine."""
    targets = [("cpu", torch.float64)]
    if torch.cuda.is_available():
        targets += [("cuda", torch.float16), ("cuda", torch.bfloat16)]
    return targets


def parity_batch(ids: torch.Tensor, rows: int = 3, length: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """A small batch from token windows, the last row left-padded so masks and positions are exercised."""
    ids = ids[:rows, :length].clone()
    mask = torch.ones_like(ids)
    if ids.shape[0] > 1:
        pad = ids.shape[1] // 4
        mask[-1, :pad] = 0
        ids[-1, :pad] = 0
    return ids, mask


@torch.no_grad()
def _logits(model, ids, mask) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False).logits.double()


def _max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return (a - b)[mask.bool()].abs().max().item()


@torch.no_grad()
def _greedy(model, ids, mask, n: int) -> torch.Tensor:
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    return out[:, ids.shape[1]:]


def _check(name, device, dtype, diff, detail="", passed=None) -> Check:
    tol = TOLERANCES[dtype]
    return Check(name, device, dtype, diff, tol, (diff <= tol) if passed is None else passed, detail)


def run_parity(dense, adapter: Adapter, plan: Plan, replaced: dict | None, ids: torch.Tensor,
               targets=None, slim_plan: Plan | None = None) -> list[Check]:
    """All checks for one plan, each target's slim model built from the dense one at that dtype.

    `slim_plan` builds the slim model from another plan than the reference uses: how tests and
    benchmarks show that a wrong slim model fails the checks.

    `dense` stays where it is; a copy is moved for each other target. That the files on disk
    hold exactly these tensors is `check_files`' job.
    """
    checks = []
    ids, mask = parity_batch(ids)
    g = adapter.geometry()
    for device, dtype in targets or parity_targets():
        dname = dtype_name(dtype)
        w = next(dense.parameters())
        d = dense if (w.device.type, w.dtype) == (device, dtype) else copy.deepcopy(dense).to(device, dtype)
        s = build_slim_model(d, adapter, slim_plan or plan, replaced)
        x, m = ids.to(device), mask.to(device)
        with replaced_weights(d, replaced), masked(d, adapter, plan_masks(plan, g)):
            ref = _logits(d, x, m)
            ref_tokens = _greedy(d, x[:1], m[:1], GENERATION_TOKENS)
        out = _logits(s, x, m)
        checks.append(_check("equivalence", device, dname, _max_diff(ref, out, m)))
        tokens = _greedy(s, x[:1], m[:1], GENERATION_TOKENS)
        del s  # one slim model alive at a time: the keep-all one below is dense-sized
        same = int((tokens == ref_tokens).all(-1).sum())
        # Required where the arithmetic is exact in meaning (float64); in half precision a near-tie
        # may flip a token on a correct model, so identity is reported there, not required.
        identical = bool(torch.equal(tokens, ref_tokens))
        checks.append(_check("generation", device, dname, 0.0, f"{same}/1 greedy runs of {GENERATION_TOKENS} "
                             f"tokens identical{'' if dtype == torch.float64 else ' (reported, not required)'}",
                             passed=identical or dtype != torch.float64))
        keep_all = build_slim_model(d, adapter, Plan.keep_all(g))
        checks.append(_check("identity", device, dname, _max_diff(_logits(d, x, m), _logits(keep_all, x, m), m)))
    return checks


def resolve_scope(scope: str, params: int) -> str:
    """`auto`: the whole-model checks when their float64 copies (about three of a model of
    `params` parameters, at 8 bytes each) fit in 80% of the available memory, else layer by layer."""
    if scope not in SCOPES:
        raise ValueError(f"parity scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    if scope != "auto":
        return scope
    from compress import memory

    return "model" if 3 * 8 * params <= 0.8 * memory.available_memory() else "layers"


def equivalence_checks(dense, adapter: Adapter, plan: Plan, replaced: dict | None, ids: torch.Tensor,
                       scope: str) -> list[Check]:
    """`run_parity` (scope "model") or `layer_equivalence` (scope "layers")."""
    if scope == "layers":
        return [layer_equivalence(dense, adapter, plan, replaced, ids)]
    return run_parity(dense, adapter, plan, replaced, ids)


@torch.no_grad()
def layer_equivalence(dense, adapter: Adapter, plan: Plan, replaced: dict | None, ids: torch.Tensor,
                      slim_plan: Plan | None = None) -> Check:
    """Equivalence one decoder layer at a time, in float64 on CPU: each slim layer == its dense
    layer masked by the plan, both fed the masked dense model's hidden states at that layer
    (from the dense model's own first-layer inputs), then the final norm and LM head likewise.

    Only one layer is held in float64 at a time, so this scales to models whose float64 copy
    does not fit in memory, where `run_parity` cannot run; layer by layer equal functions
    compose to an equal model. The batch has no padding (padding is `run_parity`'s).
    """
    from compress.slimming import slim_layer_state_dict, slim_shared_state_dict

    build = slim_plan or plan
    checker = LayerChecker(dense, adapter, plan, ids, build)
    names = {m: n for n, m in dense.named_modules()}
    for i, layer in enumerate(adapter.layers(dense)):
        prefix = names[layer] + "."
        own = {k: v for k, v in (replaced or {}).items() if k.startswith(prefix)}
        checker.step(i, layer, own, slim_layer_state_dict(dense, adapter, build, i, replaced), prefix)
    return checker.finish(slim_shared_state_dict(dense, adapter, replaced))


class LayerChecker:
    """`layer_equivalence` one layer at a time, for callers that hold one dense layer at a time
    (a model streamed from disk): `step` each layer in order, then `finish`."""

    @torch.no_grad()
    def __init__(self, dense, adapter: Adapter, plan: Plan, ids: torch.Tensor, slim_plan: Plan | None = None):
        from compress.calibration import hidden_states, layer_inputs
        from compress.slimming import layer_tables, slim_config

        self.dense, self.adapter, self.g = dense, adapter, adapter.geometry()
        plan.check(self.g)
        self.build = slim_plan or plan
        self.masks = plan_masks(plan, self.g)
        ids = ids[:2, :48].to(next(dense.parameters()).device)
        self.config = slim_config(dense, adapter, self.build)
        (args, kwargs), = layer_inputs(dense, adapter, ids, batch_size=ids.shape[0])
        self.x = _cpu64(hidden_states(args, kwargs))
        self.args = _cpu64(args[1:])
        self.kwargs = {k: _cpu64(v) for k, v in kwargs.items() if k != "hidden_states"}
        self.cos, self.sin, self.mask = layer_tables(self.config, self.x)
        rotary = adapter.rotary_module(dense)
        if "position_embeddings" in self.kwargs and rotary is not None:  # the dense model's own tables, in float64
            device = next(dense.parameters()).device
            B, T = self.x.shape[:2]
            self.kwargs["position_embeddings"] = _cpu64(rotary(self.x.to(device), torch.arange(T, device=device)
                                                               .expand(B, T)))
        self.worst, self.where = 0.0, ""

    @torch.no_grad()
    def step(self, i: int, layer, own: dict[str, torch.Tensor], slim_sd: dict[str, torch.Tensor],
             prefix: str) -> None:
        """Check dense layer i (`own`: its replaced tensors, dense names starting with `prefix`)
        against the slim layer holding `slim_sd`."""
        from compress.slim.modeling_slim import SlimDecoderLayer
        from compress.slimming import slim_config

        config = slim_config(self.dense, self.adapter, self.build, own)  # layer i's bias flags need `own`
        ref = copy.deepcopy(layer).to("cpu", torch.float64)
        with torch.device("meta"):
            slim = SlimDecoderLayer(config, i)
        slim = _module(slim, slim_sd)
        x, args, kwargs = self.x, self.args, self.kwargs
        with replaced_weights(ref, {k.removeprefix(prefix): v for k, v in own.items()}):
            handles = mask_layer(self.adapter.parts(ref), self.masks[i], self.g)
            try:
                y = ref(x, *args, **kwargs) if args else ref(hidden_states=x, **kwargs)
            finally:
                for h in handles:
                    h.remove()
        y = y[0] if isinstance(y, tuple) else y
        diff = (slim(x, self.cos, self.sin, self.mask, None) - y).abs().max().item()
        if diff > self.worst:
            self.worst, self.where = diff, f"worst at layer {i}"
        self.x = y

    @torch.no_grad()
    def finish(self, shared: dict[str, torch.Tensor]) -> Check:
        """The final norm and LM head (the slim side's from `shared`), then the check's verdict."""
        from compress.slim.modeling_slim import make_norm
        from compress.slimming import final_tensors

        dense, g = self.dense, self.g
        norm_sd, head = final_tensors(shared)
        norm = _module(make_norm(self.config, g.hidden), norm_sd)
        ref_norm = copy.deepcopy(self.adapter.final_norm(dense)).to("cpu", torch.float64)
        ref_head = dense.get_output_embeddings().weight
        x = self.x
        got, want = norm(x), ref_norm(x)
        diff = max((got @ _cpu64(head[i:i + 8192]).T - want @ _cpu64(ref_head[i:i + 8192]).T).abs().max().item()
                   for i in range(0, head.shape[0], 8192))  # a slice of the vocabulary at a time: bounded memory
        if diff > self.worst:
            self.worst, self.where = diff, "worst at the final norm and LM head"
        return _check("layers", "cpu", "float64", self.worst,
                      f"{g.num_layers} layers one at a time; {self.where or 'all exact'}")


def _cpu64(v):
    """Recorded layer inputs on the CPU, floating tensors in float64 (tuples and lists too)."""
    if isinstance(v, (tuple, list)):
        return type(v)(_cpu64(t) for t in v)
    if torch.is_tensor(v):
        return v.to("cpu", torch.float64) if v.is_floating_point() else v.cpu()
    return v


def _module(module, sd: dict[str, torch.Tensor]):
    """`module` (built on the meta device, or not) holding the tensors of `sd`, in float64 on CPU."""
    module.load_state_dict({k: _cpu64(v) for k, v in sd.items()}, strict=False, assign=True)
    missing = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if missing:
        raise RuntimeError(f"slim layer left without tensors: {missing[:5]}")
    return module.to(torch.float64).eval()


def probe_checks(pp, dense, adapter: Adapter, plan: Plan, replaced: dict | None, ids: torch.Tensor) -> list[Check]:
    """The checks of a probe-pruned model `pp` (any dtype; run as a float64 copy on CPU)."""
    from compress.probe import full_selection, random_selection, selection_plan

    g = adapter.geometry()
    ids, mask = parity_batch(ids)
    pp = copy.deepcopy(pp).to("cpu", torch.float64)
    d = copy.deepcopy(dense).to("cpu", torch.float64)
    checks = []
    for name, selection in (("probe-full", full_selection(pp)), ("probe-gather", random_selection(pp))):
        with replaced_weights(d, replaced), masked(d, adapter, plan_masks(selection_plan(plan, g, selection), g)):
            want = _logits(d, ids, mask)
        pp.model.probe_forced = selection
        checks.append(_check(name, "cpu", "float64", _max_diff(want, _logits(pp, ids, mask), mask)))
    del d
    pp.model.probe_forced = None
    with torch.no_grad():
        out = pp.generate(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=GENERATION_TOKENS,
                          min_new_tokens=GENERATION_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None,
                          return_dict_in_generate=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        pp.model.probe_forced = {key: sel["index"] for key, sel in cache.probe_selection.items()}
        again = pp.generate(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=GENERATION_TOKENS,
                            min_new_tokens=GENERATION_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None,
                            use_cache=False)
    identical = bool(torch.equal(out.sequences, again))
    checks.append(_check("probe-decode", "cpu", "float64", 0.0, f"{GENERATION_TOKENS} greedy tokens with the KV "
                         f"cache {'==' if identical else '!='} without it, under the prefill's choice", passed=identical))
    return checks


def check_files(folder: str | Path, dense, adapter: Adapter, plan: Plan, replaced: dict | None,
                expected: dict[str, torch.Tensor], scope: str = "model") -> Check:
    """The folder holds exactly `expected` (tensor by tensor), and the model transformers builds from
    it with the folder's own modeling file computes what the dense model masked by the plan computes.

    Both run in float64 on CPU; the dense weights are first rounded to the export dtype, so a
    float16 export is held to the same exact standard as a float32 one. With scope "layers" (no
    room for float64 copies of the model) only the tensors are compared: they are the ones the
    layer-by-layer check ran.
    """
    from compress.loading import load_folder_model
    from exporters.hf_folder import weights_differ

    dtype = next(iter(expected.values())).dtype  # the embeddings, first in either layout (compress.stock)
    name = dtype_name(dtype)
    problem = weights_differ(Path(folder), expected)
    if problem:
        return Check("files", "cpu", name, float("inf"), TOLERANCES["float64"], False, problem)
    if scope == "layers":
        return Check("files", "cpu", name, 0.0, TOLERANCES["float64"], True,
                     "every tensor identical to the layer-checked slim tensors (model not run: layer scope)")
    loaded = load_folder_model(folder, torch.float64)
    if getattr(loaded.model, "probing", False):  # Probe Pruning forced to keep everything: the static model
        from compress.probe import full_selection

        loaded.model.probe_forced = full_selection(loaded)
    ref = copy.deepcopy(dense).to("cpu", torch.float64)
    with torch.no_grad():
        for p in ref.parameters():  # weights only: buffers such as rotary frequencies stay exact
            p.copy_(p.to(dtype).to(torch.float64))
    rounded = {k: v.to("cpu", dtype).to(torch.float64) for k, v in (replaced or {}).items()}
    ids, mask = parity_batch(torch.randint(0, dense.config.vocab_size, (3, 32),
                                           generator=torch.Generator().manual_seed(1)))
    with replaced_weights(ref, rounded), masked(ref, adapter, plan_masks(plan, adapter.geometry())):
        want = _logits(ref, ids, mask)
    diff = _max_diff(want, _logits(loaded, ids, mask), mask)
    tol = TOLERANCES["float64"]
    return Check("files", "cpu", name, diff, tol, diff <= tol,
                 "folder loaded by transformers == masked dense (weights in the export dtype), float64")


def raise_on_failure(checks: list[Check]) -> None:
    failed = [c for c in checks if not c.passed]
    if failed:
        raise ParityError("parity failed: " + "; ".join(
            f"{c.name} on {c.device}/{c.dtype} max|diff| {c.max_abs_diff:.2e} > {c.tolerance:.0e}"
            if c.max_abs_diff > c.tolerance else f"{c.name} on {c.device}/{c.dtype}: {c.detail}" for c in failed))
