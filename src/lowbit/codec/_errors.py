"""The one error type of :mod:`lowbit.codec`."""

from __future__ import annotations

__all__ = ["CodecError"]


class CodecError(ValueError):
    """Invalid input to an encoder, or a ``.lbz`` file / coded stream that is corrupt, truncated, forged,
    or written by a newer lowbit. The message says what was wrong and what is allowed."""
