"""compress.helpers: each shared fact is right, and the slim folder's private copies equal it.

The exported folder imports nothing of compress, so modeling_slim.py and probing_slim.py keep
their own `positions` and `head_rows`; these tests are what keeps the copies from drifting.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from compress import helpers
from compress.slim import modeling_slim, probing_slim

ROOT = Path(__file__).resolve().parents[1]


def _masks(seed: int) -> torch.Tensor:
    """Left-padded rows, rows with holes, an all-padding row and an unpadded one."""
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(6, 17, generator=gen) > 0.3).long()
    mask[0] = 0
    mask[1] = 1
    mask[2, :5] = 0
    mask[2, 5:] = 1
    return mask


@pytest.mark.parametrize("seed", range(3))
def test_positions_are_the_same_in_torch_numpy_and_the_slim_copy(seed):
    mask = _masks(seed)
    want = helpers.positions(mask)
    assert want.dtype == torch.long
    assert want[1].tolist() == list(range(17)) and want[0].eq(0).all()
    assert want[2].tolist() == [0] * 6 + list(range(1, 12))
    assert torch.equal(modeling_slim.positions(mask), want)
    assert torch.equal(helpers.positions(mask.bool()), want)
    got = helpers.positions(mask.numpy())
    assert got.dtype == np.int64 and np.array_equal(got, want.numpy())


@pytest.mark.parametrize("head_dim", [1, 4, 16])
def test_head_rows_are_the_same_in_the_slim_copy(head_dim):
    gen = torch.Generator().manual_seed(head_dim)
    for n in (0, 1, 5, 12):
        heads = torch.randperm(12, generator=gen)[:n].sort().values
        want = helpers.head_rows(heads, head_dim)
        assert torch.equal(probing_slim.head_rows(heads, head_dim), want)
        assert torch.equal(helpers.head_rows(heads.tolist(), head_dim), want)  # a list of heads, as plans hold
        assert want.tolist() == [h * head_dim + j for h in heads.tolist() for j in range(head_dim)]


@pytest.mark.parametrize("name", list(helpers.SAFETENSORS_CODES))
def test_dtype_names_round_trip_and_match_safetensors(name, tmp_path):
    dtype = helpers.torch_dtype(name)
    assert isinstance(dtype, torch.dtype) and helpers.dtype_name(dtype) == name
    save_file({"t": torch.zeros(2, dtype=dtype)}, tmp_path / "t.safetensors")
    raw = (tmp_path / "t.safetensors").read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    assert header["t"]["dtype"] == helpers.SAFETENSORS_CODES[name]


def test_onnx_types_match_onnx():
    from onnx import TensorProto, helper

    assert set(helpers.DTYPES) <= set(helpers.SAFETENSORS_CODES)
    for name, (element_type, ort_type) in helpers.ONNX_TYPES.items():
        assert helper.tensor_dtype_to_np_dtype(element_type) == np.dtype(name)
        assert ort_type == f"tensor({TensorProto.DataType.Name(element_type).lower()})"


def test_the_onnx_runner_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
            "import numpy as np\n"
            "from compress.runtime import onnx_runner\n"
            "assert onnx_runner.positions(np.array([[0, 1, 1]])).tolist() == [[0, 0, 1]]\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
