"""User-facing errors: the CLI prints them as one line and exits non-zero."""

__all__ = ["CompressError", "UnsupportedModelError", "PlanMismatchError", "ParityError"]


class CompressError(Exception):
    """Bad input or a failed check that the user can act on."""


class UnsupportedModelError(CompressError):
    """The architecture, or a feature of it, is not supported."""


class PlanMismatchError(CompressError):
    """A plan was applied to a model it was not made for, or is inconsistent with it."""


class ParityError(CompressError):
    """A parity check exceeded its tolerance."""
