"""Rules every store implementation shares, so that they agree by construction: how ids are made
and which rollout status an attempt's status implies (the retry rule).

Pure functions, no I/O: safe to call from a store's worker thread as well as from the event loop.
"""

from __future__ import annotations

import os

from ..types import Attempt, RolloutConfig, RolloutStatus

__all__ = ["new_id", "rollout_status_for"]


def new_id(prefix: str) -> str:
    """A fresh random id: ``"<prefix>-"`` and 16 hex digits (``ro``: rollouts, ``at``: attempts,
    ``rs``: resources)."""
    return f"{prefix}-{os.urandom(8).hex()}"


def rollout_status_for(attempt: Attempt, config: RolloutConfig) -> RolloutStatus:
    """The rollout status implied by its latest attempt's status (retry rules included): a live or
    succeeded attempt gives its own status; a failed or unresponsive one requeues the rollout
    while ``config.retry_condition`` names that status and attempts are left, else fails it."""
    status = attempt.status
    if status in ("preparing", "running", "succeeded"):
        return status
    if status in config.retry_condition and attempt.sequence_id < config.max_attempts:
        return "requeuing"
    return "failed"
