"""A slim folder's tokenizer as llama.cpp's GGUF keys: vocabulary, merges, special tokens, chat template.

llama.cpp splits text before BPE with fixed regexes of its own, chosen by the `tokenizer.ggml.pre`
name; it never reads a regex from the file. So the folder's pre-tokenizer is recognised by its
structure, and one llama.cpp has no name for is refused: a GGUF that split text differently from
the model's tokenizer would load and quietly feed the model other tokens. Byte-level BPE only
(GPT-2, SmolLM, Llama 3, Qwen); sentencepiece-style vocabularies (byte fallback) are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from compress.errors import UnsupportedModelError

__all__ = ["add_tokenizer", "pre_tokenizer_name"]

GPT2_REGEX = "gpt-2 regex"  # what ByteLevel(use_regex=True) splits by
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# The splitting steps of a tokenizer.json pre-tokenizer -> llama.cpp's name for the same splitting
# (src/llama-vocab.cpp: LLAMA_VOCAB_PRE_TYPE_GPT2, _SMOLLM, _LLAMA3, _QWEN2).
PRE_TOKENIZERS = {
    (GPT2_REGEX,): "gpt-2",
    ("digits", GPT2_REGEX): "smollm",
    (f"split {LLAMA3_SPLIT}",): "llama-bpe",
    (f"split {QWEN2_SPLIT}",): "qwen2",
}


def _steps(pre: dict | None) -> tuple[str, ...]:
    """The text-splitting steps of a pre-tokenizer, in order (the byte mapping itself is not a split)."""
    if not pre:
        return ()
    kind = pre.get("type")
    if kind == "Sequence":
        return tuple(s for p in pre.get("pretokenizers", []) for s in _steps(p))
    if kind == "ByteLevel":
        return (GPT2_REGEX,) if pre.get("use_regex", True) else ()
    if kind == "Digits" and pre.get("individual_digits"):
        return ("digits",)
    if kind == "Split" and pre.get("behavior") == "Isolated" and not pre.get("invert"):
        pattern = pre.get("pattern", {})
        return (f"split {pattern.get('Regex', pattern.get('String'))}",)
    return (json.dumps(pre, sort_keys=True),)


def pre_tokenizer_name(tokenizer: dict) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a tokenizer.json; UnsupportedModelError when it has none."""
    model = tokenizer.get("model", {})
    decoder = (tokenizer.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder != "ByteLevel":
        raise UnsupportedModelError("GGUF: only byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3, Qwen) are written; "
                                    "this folder's is not one")
    normalizer = tokenizer.get("normalizer")
    if normalizer and normalizer.get("type") != "NFC":
        raise UnsupportedModelError(f"GGUF: the tokenizer's {normalizer.get('type')} normalizer has no "
                                    "llama.cpp counterpart")
    steps = _steps(tokenizer.get("pre_tokenizer"))
    if steps not in PRE_TOKENIZERS:
        raise UnsupportedModelError("GGUF: the tokenizer's pre-tokenizer splits text in a way no llama.cpp "
                                    "pre-tokenizer known here does")
    return PRE_TOKENIZERS[steps]


def _token_list(tokenizer: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id (byte-level strings, as GGUF's gpt2 model stores them) and their llama.cpp types."""
    from gguf import TokenType

    tokens: dict[int, tuple[str, int]] = {i: (t, TokenType.NORMAL) for t, i in tokenizer["model"]["vocab"].items()}
    for added in tokenizer.get("added_tokens", []):
        tokens[added["id"]] = (added["content"], TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED)
    if max(tokens) >= vocab_size:
        raise UnsupportedModelError(f"GGUF: the tokenizer has token id {max(tokens)}, the model "
                                    f"{vocab_size} embeddings")
    unused = lambda i: (f"[PAD{i}]", TokenType.UNUSED)  # noqa: E731  (embedding rows no token uses)
    rows = [tokens.get(i) or unused(i) for i in range(vocab_size)]
    return [t for t, _ in rows], [int(k) for _, k in rows]


def _adds_bos(folder: Path, bos_id: int | None) -> bool:
    """Whether the folder's tokenizer puts BOS before a text (its post-processor decides)."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode("a", add_special_tokens=True).ids
    return bos_id is not None and bool(ids) and ids[0] == bos_id


def add_tokenizer(writer, folder: Path, vocab_size: int) -> str:
    """Write the tokenizer keys of `folder` (tokenizer.json, tokenizer_config.json, chat template);
    returns the pre-tokenizer name. UnsupportedModelError for a tokenizer llama.cpp cannot repeat."""
    from gguf import SpecialVocab

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UnsupportedModelError(f"{folder}: no tokenizer.json; llama.cpp needs the tokenizer inside the GGUF")
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    pre = pre_tokenizer_name(tokenizer)
    tokens, types = _token_list(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    special.add_special_token["bos"] = _adds_bos(folder, special.special_token_ids.get("bos"))
    special.add_special_token.setdefault("eos", False)
    special.add_to_gguf(writer, quiet=True)
    return pre
