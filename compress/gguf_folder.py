"""A GGUF file rewritten as a safetensors folder one tensor at a time, so it can be streamed.

transformers' GGUF loader dequantizes every tensor into memory at once (in float32 before any
cast: 28 GB for a 7B model). Here each tensor is dequantized, fixed up by the same per-family
tensor processor transformers uses (llama.cpp's q/k row order undone, names mapped), cast and
appended to a shard, so memory holds one tensor; the folder then streams like any other
(`compress.source.DenseStream`). The values are those `from_pretrained(..., gguf_file=...)`
gives (tests/test_gguf.py exports both ways and compares the bytes).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from compress.errors import CompressError

__all__ = ["gguf_to_folder"]


def gguf_to_folder(path: str | Path, folder: str | Path, dtype: torch.dtype) -> None:
    """Write `path`'s config.json and weights (in `dtype`, sharded) into the existing `folder`."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from compress.loading import gguf_architecture, load_config
    from exporters.hf_folder import ShardWriter

    config = load_config(path)  # first: without the [gguf] extra, a one-line error naming it
    from gguf import GGUFReader, dequantize

    try:
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                              get_gguf_hf_weights_map)
    except ImportError:  # an internal module: a transformers release may move it
        raise CompressError("this transformers release cannot convert GGUF tensors one at a time; "
                            "use --streaming off") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    reader = GGUFReader(str(path))
    processor = TENSOR_PROCESSORS.get(gguf_architecture(reader), TensorProcessor)(config=config.to_dict())
    mapping = get_gguf_hf_weights_map(model, processor)
    parsed = {"config": config.to_dict(), "tensors": {}}  # some processors store tensors here themselves
    wanted = set(model.state_dict())
    writer = ShardWriter(Path(folder), "2GB")
    for tensor in tqdm(reader.tensors, desc="GGUF to safetensors", unit="tensor", dynamic_ncols=True):
        weights = dequantize(tensor.data, tensor.tensor_type)
        result = processor.process(weights=weights, name=tensor.name, tensor_key_mapping=mapping,
                                   parsed_parameters=parsed)
        out = dict(parsed["tensors"])
        parsed["tensors"].clear()
        if result.name in mapping:
            out[mapping[result.name]] = torch.from_numpy(np.copy(result.weights))
        for name, t in out.items():
            if name in wanted:
                writer.add(name, t.to(dtype).contiguous())
    writer.close()
    config.save_pretrained(folder)
