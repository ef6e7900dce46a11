"""Placeholder: being written."""


class SharedMemoryExecutionStrategy:
    """Not implemented yet."""
