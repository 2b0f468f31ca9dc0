"""`llama_cpp`: llama-cpp-python, imported once with a one-line error naming the extra when it is missing;
llama.cpp's own log (every tensor it loads or quantizes) is kept to errors."""

import logging

__all__ = ["llama_cpp"]

try:
    import llama_cpp
except ModuleNotFoundError:
    raise ImportError("llama-cpp-python is not installed: pip install 'compress-llm[llamacpp]'") from None

logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # the logger llama-cpp-python routes llama.cpp's log to
