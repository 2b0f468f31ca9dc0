"""`ort`: onnxruntime, imported once with a one-line error naming the extra when it is missing
or when onnxruntime and onnxruntime-gpu are both installed (they overwrite each other's files)."""

from importlib import metadata

__all__ = ["ort"]


def _distribution_installed(name: str) -> bool:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


if _distribution_installed("onnxruntime") and _distribution_installed("onnxruntime-gpu"):
    raise ImportError("onnxruntime and onnxruntime-gpu are both installed and overwrite each other's files: "
                      "pip uninstall -y onnxruntime onnxruntime-gpu, then pip install 'compress-llm[gpu]' (or [cpu])")
try:
    import onnxruntime as ort
except ModuleNotFoundError:
    raise ImportError("onnxruntime is not installed: pip install 'compress-llm[cpu]' "
                      "(or 'compress-llm[gpu]' for onnxruntime-gpu)") from None
