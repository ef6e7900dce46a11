"""Placeholder: being written."""


class ClientServerExecutionStrategy:
    """Not implemented yet."""
