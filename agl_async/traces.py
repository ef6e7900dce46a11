"""Reading an attempt's spans: as a tree of parent → children, and for the reward they carry.

For algorithms that turn traces into training data::

    spans = await store.query_spans(rollout_id, "latest")
    for root in span_tree(spans):
        for node in root.walk():
            print("  " * node.depth + node.span.name, node.span.attributes.get("gen_ai.usage.output_tokens"))
    reward = find_final_reward(spans)

A span's parent is the span of the same trace whose ``span_id`` is its ``parent_id``; spans whose
parent is not among the given ones are roots (the runner's reward span, a trace's top span, a
span whose parent was not recorded). Siblings, and roots, are ordered by ``start_time`` then
``sequence_id``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

from .semconv import REWARD_SPAN_NAME
from .store.base import LightningStore
from .types import Span

__all__ = [
    "SpanNode",
    "attempt_span_tree",
    "find_final_reward",
    "find_reward_spans",
    "reward_of_span",
    "span_tree",
]

_REWARD_ATTRIBUTE = "reward"
# Agent-Lightning 0.3's reward attributes: a list of {"name", "value"} dimensions under
# "agentlightning.reward", flattened by OpenTelemetry into "agentlightning.reward.0.value", …;
# the first dimension is the primary reward.
_AGL_REWARD = "agentlightning.reward"
_AGL_PRIMARY_VALUE = "agentlightning.reward.0.value"
# Span names whose "reward" attribute is a reward: ours, and Agent-Lightning's older ones.
_REWARD_SPAN_NAMES = frozenset({REWARD_SPAN_NAME, "agentlightning.reward", "agentlightning.annotation"})


class SpanNode:
    """One span of a tree: :attr:`span`, its :attr:`parent` node (``None`` for a root), its
    :attr:`children` (by start time) and its :attr:`depth` (0 for a root)."""

    __slots__ = ("children", "depth", "parent", "span")

    def __init__(self, span: Span) -> None:
        self.span = span
        self.parent: SpanNode | None = None
        self.children: list[SpanNode] = []
        self.depth = 0

    def __repr__(self) -> str:
        return f"SpanNode({self.span.name!r}, span_id={self.span.span_id!r}, children={len(self.children)})"

    def walk(self) -> Iterator[SpanNode]:
        """This node and its descendants, depth first, parents before children."""
        stack = [self]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(node.children))

    def find(self, name: str) -> list[SpanNode]:
        """The nodes of this subtree (itself included) whose span is named ``name``, in walk order."""
        return [node for node in self.walk() if node.span.name == name]


def _order(node: SpanNode) -> tuple[float, int]:
    start = node.span.start_time
    return (math.inf if start is None else start, node.span.sequence_id)


def span_tree(spans: Sequence[Span]) -> list[SpanNode]:
    """The spans as a forest: the root nodes, each with its descendants (see the module docstring).

    Every span appears exactly once, whatever the input: a span whose parent id names itself or a
    cycle of spans (malformed input) is cut loose as a root rather than lost."""
    nodes = [SpanNode(span) for span in spans]
    by_id: dict[tuple[str, str], SpanNode] = {}
    for node in nodes:
        by_id.setdefault((node.span.trace_id, node.span.span_id), node)
    roots: list[SpanNode] = []
    for node in nodes:
        parent_id = node.span.parent_id
        parent = by_id.get((node.span.trace_id, parent_id)) if parent_id else None
        if parent is None or parent is node:
            roots.append(node)
        else:
            node.parent = parent
            parent.children.append(node)
    # Set depths from the roots; nodes left unvisited sit on a cycle: cut one loose and go on.
    seen: set[int] = set()

    def visit(root: SpanNode) -> None:
        root.depth = 0
        stack = [root]
        while stack:
            node = stack.pop()
            seen.add(id(node))
            for child in node.children:
                child.depth = node.depth + 1
                stack.append(child)

    for root in roots:
        visit(root)
    for node in nodes:
        if id(node) not in seen:
            assert node.parent is not None
            node.parent.children.remove(node)
            node.parent = None
            roots.append(node)
            visit(node)
    for node in nodes:
        node.children.sort(key=_order)
    roots.sort(key=_order)
    return roots


async def attempt_span_tree(
    store: LightningStore, rollout_id: str, attempt_id: str | None = "latest"
) -> list[SpanNode]:
    """:func:`span_tree` of the spans of one attempt (``"latest"`` by default; ``None``: all
    attempts of the rollout)."""
    return span_tree(await store.query_spans(rollout_id, attempt_id))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def reward_of_span(span: Span) -> float | None:
    """The reward a span carries, else ``None``: the runner's reward span (attribute ``reward``),
    or Agent-Lightning's reward attributes (``agentlightning.reward.0.value``, or
    ``agentlightning.reward`` as a list of ``{"name", "value"}`` whose first is the primary
    reward), or an Agent-Lightning reward/annotation span with a ``reward`` attribute."""
    attributes = span.attributes
    if span.name in _REWARD_SPAN_NAMES and _REWARD_ATTRIBUTE in attributes:
        return _number(attributes[_REWARD_ATTRIBUTE])
    if _AGL_PRIMARY_VALUE in attributes:
        return _number(attributes[_AGL_PRIMARY_VALUE])
    dimensions = attributes.get(_AGL_REWARD)
    if isinstance(dimensions, list) and dimensions and isinstance(dimensions[0], dict):
        return _number(dimensions[0].get("value"))
    return None


def find_reward_spans(spans: Sequence[Span]) -> list[Span]:
    """The spans that carry a reward (:func:`reward_of_span`), in the given order."""
    return [span for span in spans if reward_of_span(span) is not None]


def find_final_reward(spans: Sequence[Span]) -> float | None:
    """The reward of the last span that carries one, in the given order — pass the spans as
    ``query_spans`` returns them (by attempt, then ``sequence_id``): the runner's reward span comes
    after the agent's own spans. ``None`` when no span carries a reward."""
    for span in reversed(spans):
        reward = reward_of_span(span)
        if reward is not None:
            return reward
    return None
