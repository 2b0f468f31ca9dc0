"""The shipped reference model and text slices, so tests and examples need no download.

MODEL_DIR: a ~4M-parameter Llama (GQA) trained on the Python docs (examples/train_reference.py).
CALIB_TEXT / TEST_TEXT: calibration and held-out test slices of that corpus (compress.corpus);
both are documents the model never saw in training. See data/NOTICE for their licence.
"""

from pathlib import Path

__all__ = ["MODEL_DIR", "CALIB_TEXT", "TEST_TEXT", "DATA_DIR"]

_HERE = Path(__file__).resolve().parent
MODEL_DIR = _HERE / "model"
DATA_DIR = _HERE / "data"
CALIB_TEXT = DATA_DIR / "calib.txt"
TEST_TEXT = DATA_DIR / "test.txt"
