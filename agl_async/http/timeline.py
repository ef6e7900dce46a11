"""The dashboard's history of a run: finished rollouts bucketed by end time (throughput, reward).

:class:`Timeline` is the pure aggregate; :class:`TimelineSource` keeps one up to date from a store
through the public store API only, so it works for every store:

* the first time (and whenever the store reports more finished rollouts than the timeline has
  counted, at most once per ``rebuild_interval``), it pages through every finished rollout in
  creation order, ``page`` at a time, yielding to the event loop between pages;
* otherwise it asks only for the rollouts that finished since the last look
  (``query_rollouts(status_in=finished, sort_by="end_time", sort_order="desc", limit=..)``, page
  by page until it reaches what it has seen), so a poll costs one sorted query, not a copy of
  every rollout.

Buckets start one second wide and double (merging pairs) whenever the span from the first to the
last would need more than ``target_buckets`` of them, so a run of any length is drawn with between
half ``target_buckets`` and ``target_buckets`` bars, and an insert costs O(1) amortised.

Cancellation: a refresh cancelled part-way leaves the previous timeline in place (a rebuild
fills a new one and swaps it in only when complete; an incremental step adds rollouts one by one
and each added rollout is remembered, so the next refresh does not count it twice).
"""

from __future__ import annotations

import math
import time
from typing import Any

import anyio
import anyio.lowlevel

from ..store.base import LightningStore
from ..types import TERMINAL_ROLLOUT_STATUSES, Rollout

__all__ = ["REWARD_KEY", "Timeline", "TimelineSource", "reward_of"]

#: Where the runner loop records an agent's reward on the rollout (``rollout.metadata``).
REWARD_KEY = "reward"
_FINISHED = sorted(TERMINAL_ROLLOUT_STATUSES)
# Rollouts that finished this long before the newest one seen are looked for again on the next
# refresh (end times are stamped when a store call settles them, not in call order).
_SLACK = 5.0


def reward_of(rollout: Rollout) -> float | None:
    """The reward recorded on a rollout, if it is a finite number."""
    value = rollout.metadata.get(REWARD_KEY) if isinstance(rollout.metadata, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


class Timeline:
    """Finished rollouts counted per end-time bucket: how many, by status, and their rewards."""

    def __init__(self, target_buckets: int = 90) -> None:
        self.target_buckets = target_buckets
        self.width = 1.0  # seconds
        # bucket index (floor(end_time / width)) ->
        #     [finished, succeeded, failed, cancelled, sum of rewards, rewards recorded]
        self.buckets: dict[int, list[float]] = {}
        self.count = 0
        self.rewards = 0
        self.newest: float | None = None  # the latest end time counted
        self.recent: dict[str, float] = {}  # ids counted with end time >= newest - _SLACK

    def add(self, rollout: Rollout) -> bool:
        """Count a finished rollout once; ``False`` when it was counted already (or unfinished)."""
        end = rollout.end_time
        if end is None or rollout.status not in TERMINAL_ROLLOUT_STATUSES:
            return False
        if rollout.rollout_id in self.recent:
            return False
        index = math.floor(end / self.width)
        bucket = self.buckets.get(index)
        if bucket is None:
            bucket = self.buckets[index] = [0, 0, 0, 0, 0.0, 0]
        bucket[0] += 1
        bucket[1 + ("succeeded", "failed", "cancelled").index(rollout.status)] += 1
        reward = reward_of(rollout)
        if reward is not None:
            bucket[4] += reward
            bucket[5] += 1
            self.rewards += 1
        self.count += 1
        self.recent[rollout.rollout_id] = end
        if self.newest is None or end > self.newest:
            self.newest = end
            if len(self.recent) > 4096:
                self._forget_old()
        self._coarsen()
        return True

    def _forget_old(self) -> None:
        assert self.newest is not None
        horizon = self.newest - _SLACK
        self.recent = {k: v for k, v in self.recent.items() if v >= horizon}

    def _coarsen(self) -> None:
        while len(self.buckets) > 1 and (max(self.buckets) - min(self.buckets) + 1) > self.target_buckets:
            merged: dict[int, list[float]] = {}
            for index, values in self.buckets.items():
                into = merged.get(index // 2)
                if into is None:
                    merged[index // 2] = list(values)
                else:
                    for i, v in enumerate(values):
                        into[i] += v
            self.buckets = merged
            self.width *= 2

    def snapshot(self) -> dict[str, Any]:
        """Columns for charts: bucket start times (s), counts and mean reward (``None`` where no
        reward was recorded); empty buckets between the first and the last are included."""
        t: list[float] = []
        finished: list[int] = []
        succeeded: list[int] = []
        failed: list[int] = []
        reward: list[float | None] = []
        if self.buckets:
            for index in range(min(self.buckets), max(self.buckets) + 1):
                b = self.buckets.get(index)
                t.append(index * self.width)
                finished.append(int(b[0]) if b else 0)
                succeeded.append(int(b[1]) if b else 0)
                failed.append(int(b[2] + b[3]) if b else 0)
                reward.append(b[4] / b[5] if b and b[5] else None)
        return {
            "bucket_seconds": self.width,
            "finished_total": self.count,
            "rewards_total": self.rewards,
            "t": t,
            "finished": finished,
            "succeeded": succeeded,
            "failed": failed,
            "reward_mean": reward,
        }


class TimelineSource:
    """A :class:`Timeline` of ``store`` refreshed at most every ``min_interval`` seconds, however
    many dashboards poll it (they share the refresh)."""

    def __init__(
        self,
        store: LightningStore,
        *,
        min_interval: float = 1.0,
        page: int = 1000,
        rebuild_interval: float = 60.0,
        target_buckets: int = 90,
    ) -> None:
        self.store = store
        self.min_interval = min_interval
        self.page = page
        self.rebuild_interval = rebuild_interval
        self.target_buckets = target_buckets
        self.timeline: Timeline | None = None
        self._lock = anyio.Lock()
        self._refreshed = -math.inf
        self._rebuilt = -math.inf
        self._stale = False

    async def get(self, finished_in_store: int | None = None) -> dict[str, Any]:
        """The timeline's snapshot, refreshed first if older than ``min_interval``.

        ``finished_in_store`` (the store's count of finished rollouts, taken before this call) lets
        it notice rollouts it missed; a later call then rebuilds it from scratch."""
        async with self._lock:
            now = time.monotonic()
            if now - self._refreshed >= self.min_interval:
                if self.timeline is None or (self._stale and now - self._rebuilt >= self.rebuild_interval):
                    await self._rebuild()
                    self._rebuilt = time.monotonic()
                else:
                    await self._catch_up(self.timeline)
                self._refreshed = time.monotonic()
                assert self.timeline is not None
                self._stale = finished_in_store is not None and self.timeline.count < finished_in_store
            assert self.timeline is not None
            return self.timeline.snapshot()

    async def _rebuild(self) -> None:
        timeline = Timeline(self.target_buckets)
        seen: set[str] = set()  # a rollout finishing meanwhile shifts the pages: count each once
        offset = 0
        while True:
            rollouts = await self.store.query_rollouts(status_in=_FINISHED, limit=self.page, offset=offset)  # type: ignore[arg-type]
            for rollout in sorted(rollouts, key=lambda r: r.end_time or 0.0):
                if rollout.rollout_id not in seen:
                    seen.add(rollout.rollout_id)
                    timeline.add(rollout)
            if len(rollouts) < self.page:
                break
            offset += len(rollouts)
            await anyio.lowlevel.checkpoint()  # let requests in between pages
        self.timeline = timeline

    async def _catch_up(self, timeline: Timeline) -> None:
        horizon = -math.inf if timeline.newest is None else timeline.newest - _SLACK
        offset = 0
        page = min(self.page, 256)
        while True:
            rollouts = await self.store.query_rollouts(
                status_in=_FINISHED,  # type: ignore[arg-type]
                sort_by="end_time",
                sort_order="desc",
                limit=page,
                offset=offset,
            )
            reached = False
            for rollout in reversed(rollouts):  # oldest first, so the buckets grow at the end
                if rollout.end_time is not None and rollout.end_time >= horizon:
                    timeline.add(rollout)
            if rollouts and (rollouts[-1].end_time or 0.0) < horizon:
                reached = True
            if reached or len(rollouts) < page:
                return
            offset += len(rollouts)
            page = self.page
            await anyio.lowlevel.checkpoint()
