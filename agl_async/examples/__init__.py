"""Runnable examples. :mod:`agl_async.examples.evolution` is the ``agl-async demo``."""

__all__: list[str] = []
