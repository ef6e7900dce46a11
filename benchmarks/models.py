"""Cost of the data model: msgspec (what agl_async uses) against pydantic v2, per object.

Run: ``python benchmarks/models.py [--number 20000]``. Prints JSON with microseconds per
operation (best of 5 ``timeit`` runs) for a Rollout and a Span:

* ``construct``: build the object from keyword arguments (what the store's hot path does);
  msgspec does not validate here, pydantic does;
* ``encode``: object -> JSON bytes;
* ``decode``: JSON bytes -> validated object (both validate).

The pydantic models mirror agl_async's field for field (same types, defaults and literals).
pydantic is not a dependency of agl_async: its column is skipped, with a note, when it is not
importable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import timeit
from collections.abc import Callable
from typing import Any, Literal

import msgspec

from agl_async import Rollout, RolloutConfig, Span
from agl_async.types import from_json, to_json

ROLLOUT_KW: dict[str, Any] = dict(
    rollout_id="ro-0123456789abcdef",
    input={"question": "What is 2 + 2?", "answer": "4", "id": 17},
    mode="train",
    resources_id="rs-0123456789abcdef",
    metadata={"source": "gsm8k"},
)
SPAN_KW: dict[str, Any] = dict(
    rollout_id="ro-0123456789abcdef",
    attempt_id="at-0123456789abcdef",
    sequence_id=3,
    trace_id="0" * 32,
    span_id="0" * 16,
    name="openai.chat.completion",
    parent_id="1" * 16,
    start_time=1_700_000_000.0,
    end_time=1_700_000_001.5,
    attributes={"gen_ai.request.model": "qwen", "gen_ai.usage.prompt_tokens": 123, "reward": 1.0},
)


def _best_us(fn: Callable[[], object], number: int) -> float:
    return round(min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6, 3)


def _measure(
    make: Callable[[], Any], encode: Callable[[Any], bytes], decode: Callable[[bytes], Any], n: int
) -> dict[str, float]:
    obj = make()
    data = encode(obj)
    assert decode(data) == obj
    return {
        "construct_us": _best_us(make, n),
        "encode_us": _best_us(lambda: encode(obj), n),
        "decode_us": _best_us(lambda: decode(data), n),
        "json_bytes": len(data),
    }


def bench_msgspec(n: int) -> dict[str, Any]:
    config = RolloutConfig()
    return {
        "version": msgspec.__version__,
        "Rollout": _measure(
            lambda: Rollout(**ROLLOUT_KW, start_time=time.time(), config=config),
            to_json,
            lambda b: from_json(b, Rollout),
            n,
        ),
        "Span": _measure(lambda: Span(**SPAN_KW), to_json, lambda b: from_json(b, Span), n),
    }


def bench_pydantic(n: int) -> dict[str, Any]:
    try:
        import pydantic
        from pydantic import BaseModel, Field
    except ImportError:
        return {"skipped": "pydantic is not importable in this environment"}

    class PConfig(BaseModel):
        timeout_seconds: float | None = None
        unresponsive_seconds: float | None = None
        max_attempts: int = Field(default=1, ge=1)
        retry_condition: list[
            Literal["preparing", "running", "succeeded", "failed", "unresponsive", "timeout"]
        ] = Field(default_factory=list)

    class PRollout(BaseModel):
        rollout_id: str
        input: Any
        start_time: float = Field(default_factory=time.time)
        end_time: float | None = None
        mode: Literal["train", "val", "test"] | None = None
        resources_id: str | None = None
        status: Literal[
            "queuing", "preparing", "running", "succeeded", "failed", "cancelled", "requeuing"
        ] = "queuing"
        config: PConfig = Field(default_factory=PConfig)
        metadata: dict[str, Any] = Field(default_factory=dict)

    class PSpan(BaseModel):
        rollout_id: str
        attempt_id: str
        sequence_id: int
        trace_id: str
        span_id: str
        name: str
        parent_id: str | None = None
        start_time: float | None = None
        end_time: float | None = None
        attributes: dict[str, Any] = Field(default_factory=dict)
        events: list[dict[str, Any]] = Field(default_factory=list)
        status_code: Literal["unset", "ok", "error"] = "unset"
        status_message: str | None = None

    config = PConfig()
    return {
        "version": pydantic.VERSION,
        "Rollout": _measure(
            lambda: PRollout(**ROLLOUT_KW, start_time=time.time(), config=config),
            lambda o: o.model_dump_json().encode(),
            PRollout.model_validate_json,
            n,
        ),
        "Span": _measure(
            lambda: PSpan(**SPAN_KW),
            lambda o: o.model_dump_json().encode(),
            PSpan.model_validate_json,
            n,
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=20_000, help="calls per timeit run")
    args = parser.parse_args()
    results = {"msgspec": bench_msgspec(args.number), "pydantic": bench_pydantic(args.number)}
    ratios: dict[str, dict[str, float]] = {}
    if "skipped" not in results["pydantic"]:
        for model in ("Rollout", "Span"):
            ratios[model] = {
                op: round(results["pydantic"][model][op] / results["msgspec"][model][op], 1)
                for op in ("construct_us", "encode_us", "decode_us")
            }
    report = {
        "benchmark": "models",
        "unit": "microseconds per operation (best of 5 timeit runs)",
        "python": sys.version.split()[0],
        "results": results,
        "pydantic_over_msgspec": ratios,
        "note": (
            "msgspec construction does not validate (decoding does); pydantic validates both. "
            "msgspec omits fields at their defaults from JSON, pydantic's model_dump_json writes all."
        ),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
