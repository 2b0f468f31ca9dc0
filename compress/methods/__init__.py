"""Pruning methods; importing this package registers every built-in method in `METHODS`."""

from compress.methods.base import METHODS, Method, PruneResult
from compress.methods import flap, magnitude, wanda_sp  # noqa: F401  (registration)
from . import disp  # noqa: F401
from . import tyr  # noqa: F401
from . import tyr_disp  # noqa: F401
from . import probe  # noqa: F401

__all__ = ["METHODS", "Method", "PruneResult"]
