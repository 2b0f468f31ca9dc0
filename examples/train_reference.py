"""Train the shipped reference model: split + byte-level BPE tokenizer + a ~4M-param Llama (GQA).

The project needs a real, trained causal LM that is small enough to ship in the package
and to prune/evaluate on a CPU in seconds; a random model would make every quality
figure meaningless. Run from the repository root:

    python examples/train_reference.py                # writes compress/reference/{model,data}
    python examples/train_reference.py --steps 20 --out /tmp/ref --data-out /tmp/ref-data  # timing

Deterministic for a given seed on a given device (seeded init, fixed data order).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress import corpus  # noqa: E402
from compress.reference import DATA_DIR, MODEL_DIR  # noqa: E402
from compress.textdata import load_text, token_stream, windows  # noqa: E402
from validation.quality import perplexity  # noqa: E402

EOS = "<|endoftext|>"


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style pre-tokenization, no unknown tokens) trained on `texts`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS,
                                   pad_token=EOS, model_max_length=512)


def model_config(tokenizer, vocab_size: int) -> LlamaConfig:
    eos = tokenizer.convert_tokens_to_ids(EOS)
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, hidden_act="silu",
        max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, dtype="float32",
    )


def lr_at(step: int, steps: int, warmup: int, peak: float, floor: float) -> float:
    """Linear warmup to `peak`, then cosine decay to `floor` * peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


MODEL_CARD = """\
---
license: other
license_name: psf-2.0
library_name: transformers
pipeline_tag: text-generation
---

# compress reference model (Llama, GQA, {params_m:.2f}M parameters)

A tiny causal LM trained from scratch so the `compress` project has a real, trained model to
prune, export and evaluate on a CPU in seconds. It is not meant to be useful for anything else.

- Architecture: `LlamaForCausalLM`, {layers} layers, hidden {hidden}, {heads} query heads /
  {kv_heads} KV heads (GQA, head dim {head_dim}), SwiGLU intermediate {inter}, RMSNorm, RoPE,
  tied embeddings, vocab {vocab}, max positions {max_pos}; float32 safetensors.
- Tokenizer: byte-level BPE, vocab {vocab}, trained on the training split; `{eos}` is BOS/EOS/PAD
  (nothing is added automatically when encoding).
- Data: reStructuredText sources of the Python 3.11 documentation (Debian `python3.11-doc`),
  document-level split with seed {seed} (`compress.corpus.build_split`): {n_train} training
  documents ({train_tokens:,} tokens); calibration ({n_calib} docs) and held-out test ({n_test} docs)
  slices ship in `compress/reference/data/`.
- Training (`{command}`): {steps} steps x batch {batch} x {seq_len}
  tokens ({seen_tokens:,} tokens, {epochs:.2f} epochs), AdamW (lr {lr:g}, betas 0.9/0.95,
  weight decay {wd:g}), {warmup} warmup steps then cosine decay to {floor:g}x, gradient clipping 1.0,
  {precision}, on {device} ({threads} torch threads) in {minutes:.1f} min; final training loss
  {final_loss:.3f} (moving average).

## Held-out perplexity

On the test slice (`compress/reference/data/test.txt`, {test_tokens:,} tokens), fixed
non-overlapping {seq_len}-token windows: **{test_ppl:.2f}** ({test_windows} windows).
Calibration slice: {calib_ppl:.2f}. A uniform guess over the vocabulary is {vocab}.
Reproduce with `compress eval`.

## Licence of the data

The training text is the Python documentation, Copyright © 2001-2023 Python Software
Foundation, all rights reserved, licensed under the PSF License Agreement (code examples also
under the Zero-Clause BSD licence). See `compress/reference/data/NOTICE` for the full notice.
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=None, help="default: 5%% of steps")
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                    help="bf16 autocast for the training forward (weights and optimizer stay float32)")
    ap.add_argument("--corpus", type=Path, default=corpus.SOURCE_DIR)
    ap.add_argument("--out", type=Path, default=MODEL_DIR)
    ap.add_argument("--data-out", type=Path, default=DATA_DIR)
    args = ap.parse_args(argv)

    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    split = corpus.build_split(args.corpus, seed=args.seed)
    corpus.write_slices(args.data_out, split, args.corpus)
    train_docs = [corpus.join_documents(args.corpus, [d]) for d in split.train]
    tokenizer = train_tokenizer(train_docs, args.vocab_size)
    train_ids = token_stream(tokenizer, corpus.join_documents(args.corpus, split.train))
    train_wins = windows(train_ids, args.seq_len)
    print(f"split: {len(split.train)} train / {len(split.calib)} calib / {len(split.test)} test docs; "
          f"{len(train_ids):,} train tokens, {len(train_wins)} windows of {args.seq_len}", flush=True)

    config = model_config(tokenizer, args.vocab_size)
    model = LlamaForCausalLM(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)

    gen = torch.Generator().manual_seed(args.seed)
    order, cursor, ema = torch.randperm(len(train_wins), generator=gen), 0, None
    model.train()
    t_train = time.time()
    bar = tqdm(range(args.steps), desc="train", dynamic_ncols=True, mininterval=2.0)
    for step in bar:
        if cursor + args.batch_size > len(order):  # next epoch: fresh fixed permutation
            order, cursor = torch.randperm(len(train_wins), generator=gen), 0
        x = train_wins[order[cursor:cursor + args.batch_size]].to(device)
        cursor += args.batch_size
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, warmup, args.lr, args.min_lr_ratio)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                 x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        tok_s = (step + 1) * args.batch_size * args.seq_len / (time.time() - t_train)
        bar.set_postfix(loss=f"{ema:.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}", tok_s=f"{tok_s:.0f}")
    train_minutes = (time.time() - t_train) / 60

    model.eval()
    test_ids = token_stream(tokenizer, load_text(args.data_out / "test.txt"))
    calib_ids = token_stream(tokenizer, load_text(args.data_out / "calib.txt"))
    test = perplexity(model, test_ids, args.seq_len, 16, device)
    calib = perplexity(model, calib_ids, args.seq_len, 16, device)
    print(f"held-out test perplexity {test.perplexity:.2f} (fixed {args.seq_len}-token windows, "
          f"{test.windows} windows); calib {calib.perplexity:.2f}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    model.to("cpu").save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    seen = args.steps * args.batch_size * args.seq_len
    (args.out / "README.md").write_text(MODEL_CARD.format(
        params_m=n_params / 1e6, layers=config.num_hidden_layers, hidden=config.hidden_size,
        heads=config.num_attention_heads, kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
        inter=config.intermediate_size, vocab=config.vocab_size, max_pos=config.max_position_embeddings,
        eos=EOS, seed=args.seed, command=(f"python examples/train_reference.py --seed {args.seed} --steps {args.steps} "
                 f"--batch-size {args.batch_size} --lr {args.lr:g} --threads {args.threads}"), n_train=len(split.train), train_tokens=len(train_ids),
        n_calib=len(split.calib), n_test=len(split.test), steps=args.steps, batch=args.batch_size,
        seq_len=args.seq_len, seen_tokens=seen, epochs=seen / len(train_ids), lr=args.lr,
        wd=args.weight_decay, warmup=warmup, floor=args.min_lr_ratio, device=device.type,
        threads=args.threads, precision="bf16 autocast" if args.bf16 else "float32",
        minutes=train_minutes, final_loss=ema, test_tokens=len(test_ids),
        test_ppl=test.perplexity, test_windows=test.windows, calib_ppl=calib.perplexity,
    ), encoding="utf-8")
    summary = {"params": n_params, "train_tokens": len(train_ids), "steps": args.steps,
               "batch_size": args.batch_size, "seq_len": args.seq_len, "train_minutes": train_minutes,
               "total_minutes": (time.time() - t_start) / 60, "final_loss_ema": ema,
               "test": test.to_dict(), "calib": calib.to_dict(), "device": device.type}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
