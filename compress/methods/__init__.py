"""Pruning methods: one class per method, registered in `METHODS`.

Each method's description, defaults and command-line options are in `compress.methods.options`,
which imports no torch, so the command line's parser is built without it. The classes (and torch
with them) are imported, and registered, on first use of METHODS, Method or PruneResult.
"""

__all__ = ["METHODS", "Method", "PruneResult"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'compress.methods' has no attribute {name!r}")
    from compress.methods import base, disp, flap, magnitude, probe, tyr, tyr_disp, wanda_sp  # noqa: F401  (registration)

    return getattr(base, name)
