"""Placeholder: being written."""


class LightningStoreClient:
    """Not implemented yet."""
