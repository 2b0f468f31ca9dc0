"""Properties of the quality metrics and text windows, on tiny models (no files, no network)."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from compress.textdata import MAX_CALIB_WINDOWS, calibration_windows, load_text, spread_offsets, windows
from validation.quality import compare, perplexity

V = 64


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


class FixedLogits(torch.nn.Module):
    """A 'model' whose next-token logits are the same vector at every position."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, input_ids):
        b, n = input_ids.shape
        return SimpleNamespace(logits=self.logits.expand(b, n, -1))


def random_ids(n: int = 400, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


# --- windows / load_text -------------------------------------------------------------------

def test_windows_fixed_and_sliding():
    ids = torch.arange(10)
    assert windows(ids, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert windows(ids, 4, stride=2).tolist() == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]]
    assert windows(ids, 4, max_windows=1).tolist() == [[0, 1, 2, 3]]
    assert windows(ids, 4).dtype == torch.long


def test_calibration_windows_take_all_the_text_up_to_the_cap_spread_over_it():
    assert calibration_windows(torch.arange(10), 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    [one] = calibration_windows(torch.arange(10), 4, 1).tolist()
    assert one == list(range(one[0], one[0] + 4))
    n = 4 * (3 * MAX_CALIB_WINDOWS) + 2  # three times the windows the cap takes
    capped = calibration_windows(torch.arange(n), 4)
    assert capped.shape == (MAX_CALIB_WINDOWS, 4)
    assert capped[0, 0] < 12 and capped[-1, -1] >= n - 12  # from the start of the text to its end, not its first third
    with pytest.raises(ValueError, match="3 requested"):
        calibration_windows(torch.arange(10), 4, 3)


@pytest.mark.parametrize("n_tokens,n", [(1000, 7), (100_000, 32), (257, 1), (40, 10)])
def test_spread_windows_cover_the_whole_text_reproducibly(n_tokens, n):
    """Evenly spaced, never overlapping, the first near the start and the last near the end;
    the same seed gives the same offsets."""
    seq_len = 4
    offsets = spread_offsets(n_tokens, seq_len, n, seed=5)
    step = n_tokens // n
    assert len(offsets) == n and offsets == spread_offsets(n_tokens, seq_len, n, seed=5)
    assert offsets[0] <= step - seq_len and offsets[-1] + seq_len > n_tokens - step
    assert all(b - a == step >= seq_len for a, b in zip(offsets, offsets[1:]))
    assert offsets[-1] + seq_len <= n_tokens
    shifts = {spread_offsets(100_000, seq_len, 32, seed)[0] for seed in range(5)}
    assert len(shifts) > 1  # the seed moves them
    assert spread_offsets(40, 4) == list(range(0, 40, 4))  # None: every window, from the start


def test_figures_are_measured_on_the_recorded_spread_windows():
    """max_windows scores the windows at the recorded offsets (not the first ones), and says so."""
    model, ids = tiny_llama(), random_ids(n=4000)
    res = perplexity(model, ids, seq_len=32, batch_size=4, max_windows=5, seed=2, progress=False)
    assert res.offsets == spread_offsets(4000, 32, 5, seed=2) and res.windows == 5 and res.text_tokens == 4000
    assert res.offsets[-1] > 3000
    again = perplexity(model, torch.cat([ids[o:o + 32] for o in res.offsets]), seq_len=32, batch_size=4, progress=False)
    assert res.perplexity == pytest.approx(again.perplexity, rel=1e-6)
    first = perplexity(model, ids[:5 * 32], seq_len=32, batch_size=4, progress=False)
    assert res.perplexity != pytest.approx(first.perplexity, rel=1e-6)


def test_windows_errors_on_short_text():
    with pytest.raises(ValueError, match="too short") as e:
        windows(torch.arange(3), 4)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="too short"):
        windows(torch.arange(10), 4, max_windows=3)  # only 2 fit
    with pytest.raises(ValueError):
        windows(torch.arange(10), 4, stride=5)


def test_load_text_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text(" \n")
    with pytest.raises(ValueError, match="empty"):
        load_text(tmp_path / "empty.txt")
    (tmp_path / "ok.txt").write_text("hello\n")
    assert load_text(tmp_path / "ok.txt") == "hello\n"


# --- perplexity ----------------------------------------------------------------------------

def test_uniform_model_perplexity_is_vocab_size():
    model = FixedLogits(torch.zeros(V))
    for stride in (None, 8):
        res = perplexity(model, random_ids(), seq_len=32, batch_size=3, stride=stride, progress=False)
        assert res.perplexity == pytest.approx(V, rel=1e-6)


def test_constant_text_perplexity_matches_margin():
    """Logit margin m on the right token: ppl = 1 + (V-1) e^-m exactly; near 1 for a large margin."""
    ids = torch.full((300,), 7)
    for m in (0.0, 2.0, 20.0):
        logits = torch.zeros(V)
        logits[7] = m
        res = perplexity(FixedLogits(logits), ids, seq_len=32, batch_size=4, progress=False)
        assert res.perplexity == pytest.approx(1 + (V - 1) * math.exp(-m), rel=1e-5)
    assert res.perplexity < 1.0001


def test_llama_trained_on_constant_text_reaches_ppl_one():
    torch.manual_seed(0)
    model = tiny_llama()
    ids = torch.full((256,), 5)
    before = perplexity(model, ids, seq_len=32, batch_size=8, progress=False).perplexity
    assert math.isfinite(before) and before > 10
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = windows(ids, 32)
    model.train()
    for _ in range(30):
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = perplexity(model, ids, seq_len=32, batch_size=8, progress=False).perplexity
    assert after < 1.05


def test_fixed_equals_sliding_with_full_stride_and_counts():
    model, ids = tiny_llama(), random_ids()
    fixed = perplexity(model, ids, seq_len=32, batch_size=4, progress=False)
    same = perplexity(model, ids, seq_len=32, batch_size=4, stride=32, progress=False)
    assert fixed.mode == same.mode == "fixed" and fixed.stride is None
    assert same.perplexity == pytest.approx(fixed.perplexity, rel=1e-6)
    assert fixed.windows == 400 // 32 and fixed.tokens == fixed.windows * 31
    sliding = perplexity(model, ids, seq_len=32, batch_size=4, stride=8, progress=False)
    assert sliding.mode == "sliding" and sliding.stride == 8
    n = (400 - 32) // 8 + 1
    assert sliding.windows == n and sliding.tokens == 31 + (n - 1) * 8  # each token scored once


def test_batch_size_does_not_change_result():
    model, ids = tiny_llama(), random_ids()
    a = perplexity(model, ids, seq_len=32, batch_size=1, progress=False)
    b = perplexity(model, ids, seq_len=32, batch_size=5, progress=False)
    assert a.perplexity == pytest.approx(b.perplexity, rel=1e-5)


# --- compare -------------------------------------------------------------------------------

def test_kl_of_model_against_itself_is_zero():
    model, ids = tiny_llama(), random_ids()
    res = compare(model, model, ids, seq_len=32, batch_size=4, progress=False)
    assert abs(res.kl) < 1e-6
    assert res.top1_agreement == 1.0
    assert res.perplexity == pytest.approx(res.reference_perplexity, rel=1e-9)
    json.dumps(res.to_dict())


def test_kl_between_different_models_is_positive_and_matches_ppl():
    a, b, ids = tiny_llama(0), tiny_llama(1), random_ids()
    res = compare(a, b, ids, seq_len=32, batch_size=4, stride=16, progress=False)
    assert res.kl > 1e-4 and 0.0 <= res.top1_agreement < 1.0
    assert res.mode == "sliding"
    pa = perplexity(a, ids, seq_len=32, batch_size=4, stride=16, progress=False)
    assert res.perplexity == pytest.approx(pa.perplexity, rel=1e-5)
    assert json.loads(json.dumps(res.to_dict()))["kl"] == pytest.approx(res.kl)


class Bigram(torch.nn.Module):
    """A 'model' whose next-token logits depend on the current token only: table[token]."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table[input_ids])


def test_kl_and_agreement_match_a_direct_computation():
    """Hand-made case: the figures equal KL and argmax agreement computed position by position."""
    g = torch.Generator().manual_seed(3)
    ref_table, model_table = torch.randn(V, V, generator=g) * 3, torch.randn(V, V, generator=g) * 3
    ids = random_ids(n=161, seed=4)
    res = compare(Bigram(model_table), Bigram(ref_table), ids, seq_len=32, batch_size=2, progress=False)
    kl = agree = nll = 0.0
    count = 0
    for w in range(len(ids) // 32):
        x = ids[w * 32:(w + 1) * 32]
        for t in range(31):  # positions 0..30 predict tokens 1..31 of the window
            p = torch.softmax(ref_table[x[t]].double(), -1)
            q = torch.softmax(model_table[x[t]].double(), -1)
            kl += float((p * (p.log() - q.log())).sum())
            agree += int(ref_table[x[t]].argmax() == model_table[x[t]].argmax())
            nll -= float(q[x[t + 1]].log())
            count += 1
    assert res.tokens == count == 5 * 31
    assert res.kl == pytest.approx(kl / count, rel=1e-5)
    assert res.top1_agreement == pytest.approx(agree / count)
    assert res.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert 0 < res.top1_agreement < 1  # the case exercises both outcomes
