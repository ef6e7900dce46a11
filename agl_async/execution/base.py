"""Placeholder: being written."""


class ExecutionEvent:
    """Not implemented yet."""


class ExecutionStrategy:
    """Not implemented yet."""
