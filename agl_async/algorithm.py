"""Placeholder: being written."""


class Algorithm:
    """Not implemented yet."""
