"""Placeholder: being written."""


class Trainer:
    """Not implemented yet."""
