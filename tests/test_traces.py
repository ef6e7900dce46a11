"""Reading spans as a tree and finding the reward (agl_async.traces)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agl_async import InMemoryLightningStore, Span
from agl_async.semconv import REWARD_SPAN_NAME
from agl_async.traces import (
    attempt_span_tree,
    find_final_reward,
    find_reward_spans,
    reward_of_span,
    span_tree,
)


def span(
    span_id: str, parent: str | None = None, *, seq: int = 1, start: float | None = 0.0, **kw: Any
) -> Span:
    fields: dict[str, Any] = {"trace_id": "t", "name": span_id, "start_time": start, **kw}
    return Span(rollout_id="r", attempt_id="a", sequence_id=seq, span_id=span_id, parent_id=parent, **fields)


def shape(roots: list[Any]) -> list[Any]:
    return [(node.span.span_id, node.depth, shape(node.children)) for node in roots]


def test_parents_children_depths_and_order_by_start_time() -> None:
    spans = [
        span("child-late", "root", seq=1, start=3.0),
        span("grandchild", "child-early", seq=2, start=2.5),
        span("child-early", "root", seq=3, start=2.0),
        span("root", None, seq=4, start=1.0),
        span("reward", None, seq=5, start=0.5),
    ]
    roots = span_tree(spans)
    assert shape(roots) == [
        ("reward", 0, []),
        ("root", 0, [("child-early", 1, [("grandchild", 2, [])]), ("child-late", 1, [])]),
    ]
    root = roots[1]
    assert [n.span.span_id for n in root.walk()] == ["root", "child-early", "grandchild", "child-late"]
    assert root.children[0].children[0].parent is root.children[0] and root.parent is None
    assert [n.span.span_id for n in root.find("grandchild")] == ["grandchild"]


def test_a_parent_is_looked_up_in_the_same_trace_only_and_orphans_are_roots() -> None:
    spans = [span("p"), span("c", "p", trace_id="other"), span("o", "missing")]
    assert shape(span_tree(spans)) == [("p", 0, []), ("c", 0, []), ("o", 0, [])]  # ties: given order


def test_malformed_parent_links_lose_no_span() -> None:
    spans = [span("self", "self"), span("a", "b", start=1.0), span("b", "a", start=2.0)]
    roots = span_tree(spans)
    assert sorted(n.span.span_id for root in roots for n in root.walk()) == ["a", "b", "self"]


@given(st.lists(st.tuples(st.integers(0, 6), st.one_of(st.none(), st.integers(0, 6))), max_size=12))
def test_every_span_appears_exactly_once(links: list[tuple[int, int | None]]) -> None:
    spans = [span(str(i), None if p is None else str(p), seq=k) for k, (i, p) in enumerate(links)]
    roots = span_tree(spans)
    walked = [id(node.span) for root in roots for node in root.walk()]
    assert sorted(walked) == sorted(id(s) for s in spans)
    for root in roots:
        for node in root.walk():
            assert node.depth == (0 if node.parent is None else node.parent.depth + 1)


@pytest.mark.parametrize(
    ("name", "attributes", "reward"),
    [
        (REWARD_SPAN_NAME, {"reward": 0.75}, 0.75),
        ("anything", {"agentlightning.reward.0.name": "primary", "agentlightning.reward.0.value": 2}, 2.0),
        ("anything", {"agentlightning.reward": [{"name": "primary", "value": 0.5}, {"value": 9}]}, 0.5),
        ("agentlightning.annotation", {"reward": 1.5}, 1.5),
        ("agentlightning.reward", {"reward": -1}, -1.0),
        ("llm", {"reward": 1.0}, None),  # a "reward" attribute on another span is not a reward
        (REWARD_SPAN_NAME, {"reward": "high"}, None),
        (REWARD_SPAN_NAME, {"reward": True}, None),
        ("anything", {}, None),
    ],
)
def test_reward_of_span(name: str, attributes: dict[str, Any], reward: float | None) -> None:
    assert reward_of_span(span("s", name=name, attributes=attributes)) == reward


def test_the_final_reward_is_the_last_one() -> None:
    spans = [
        span("1", seq=1, name="agentlightning.reward", attributes={"reward": 0.1}),
        span("2", seq=2, name="llm"),
        span("3", seq=3, name=REWARD_SPAN_NAME, attributes={"reward": 0.9}),
        span("4", seq=4, name="after"),
    ]
    assert find_final_reward(spans) == 0.9
    assert [s.span_id for s in find_reward_spans(spans)] == ["1", "3"]
    assert find_final_reward(spans[1:2]) is None and find_final_reward([]) is None


@pytest.mark.anyio
async def test_attempt_span_tree_reads_the_latest_attempt() -> None:
    store = InMemoryLightningStore()
    first = await store.start_rollout(None)
    second = await store.start_attempt(first.rollout_id)
    for attempt in (first.attempt.attempt_id, second.attempt.attempt_id):
        await store.add_many_spans(
            [
                Span(rollout_id=first.rollout_id, attempt_id=attempt, sequence_id=0, trace_id="t",
                     span_id=i, name=i, parent_id=p)
                for i, p in (("root", None), (f"child-of-{attempt}", "root"))
            ]
        )  # fmt: skip
    [root] = await attempt_span_tree(store, first.rollout_id)
    assert [c.span.name for c in root.children] == [f"child-of-{second.attempt.attempt_id}"]
    assert len(await attempt_span_tree(store, first.rollout_id, None)) == 2
