"""The equivalence check fails when the slim model is built from a plan that is wrong in one place.

The check compares a slim model with the dense model masked by the plan; here the slim model
is (deliberately) built from a mutated copy of the plan: one residual index off, one query
head swapped for a pruned one of the same KV group, one MLP channel taken from another
layer's kept set. A correct plan must pass on the same models.
"""

from __future__ import annotations

import pytest
import torch

from compress import prune
from compress.adapters import get_adapter
from compress.loading import load_model, load_tokenizer
from compress.reference import CALIB_TEXT
from compress.textdata import calibration_windows, load_text, token_stream
from validation import parity
from validation.mutations import MUTATIONS, mutate
from test_slim import odd_plan
from tiny import TINY_CONFIGS, tiny_model


def equivalence(model, plan, replaced, ids, slim_plan=None, scope="model") -> parity.Check:
    """The whole-model check (`run_parity`) or the one-layer-at-a-time check (`layer_equivalence`)."""
    adapter = get_adapter(model.config)
    if scope == "layers":
        return parity.layer_equivalence(model, adapter, plan, replaced, ids, slim_plan=slim_plan)
    checks = parity.run_parity(model, adapter, plan, replaced, ids, targets=[("cpu", torch.float64)],
                               slim_plan=slim_plan)
    return next(c for c in checks if c.name == "equivalence")


def _check_all(model, plan, replaced, ids, scope="model") -> None:
    g = get_adapter(model.config).geometry()
    ok = equivalence(model, plan, replaced, ids, scope=scope)
    assert ok.passed, ok.line()
    tried = 0
    for kind in MUTATIONS:
        wrong = mutate(plan, g, kind)
        if wrong is None:
            continue
        tried += 1
        c = equivalence(model, plan, replaced, ids, slim_plan=wrong, scope=scope)
        assert not c.passed, f"{kind} not caught: {c.line()}"
        assert c.max_abs_diff > 100 * c.tolerance, c.line()  # caught by a wide margin, not by luck
    assert tried >= 2


@pytest.mark.parametrize("scope", ["model", "layers"])
@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_mutated_plans_fail_equivalence_on_every_family(family, scope):
    model = tiny_model(family)
    plan = odd_plan(get_adapter(model.config).geometry())
    ids = torch.randint(0, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    _check_all(model, plan, None, ids, scope)


@pytest.mark.parametrize("scope", ["model", "layers"])
@pytest.mark.parametrize("method", ["wanda-sp", "flap"])
def test_mutated_plans_fail_equivalence_on_the_reference_model(method, scope):
    model, tok = load_model(), load_tokenizer()
    calib = calibration_windows(token_stream(tok, load_text(CALIB_TEXT)), 64, 16)
    result = prune(model, method, 0.5, calib)
    _check_all(model, result.plan, result.replaced, calib, scope)

