"""Placeholder: being written."""


class LightningStoreServer:
    """Not implemented yet."""
