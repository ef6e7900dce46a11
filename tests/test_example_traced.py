"""The traced example: a local OpenAI-compatible mock, an agent calling it through an instrumented
httpx client, and an algorithm that learns only from the spans (``agl-async demo --traced``)."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from agl_async.examples.mock_openai import MODEL, MockOpenAI, answer
from agl_async.examples.traced import PROMPTS, make_questions, run_traced_demo

TIMEOUT = 120


def test_the_mock_model_is_right_when_it_thinks_step_by_step() -> None:
    assert answer("Think step by step.", "What is 17 + 25?").endswith("The answer is 42.")
    assert answer("", "What is 17 + 24?") == "The answer is 41."
    assert answer("", "What is 20 + 10?") == "The answer is 31."  # multiples of 3 are off by one
    assert answer("", "What is the capital of France?") == "I can only add two numbers."


@pytest.mark.anyio
async def test_the_mock_speaks_the_chat_completions_api() -> None:
    async with MockOpenAI() as llm, httpx.AsyncClient(base_url=llm.endpoint) as client:
        messages = [
            {"role": "system", "content": "Think step by step."},
            {"role": "user", "content": "1 + 2"},
        ]
        data = (await client.post("/chat/completions", json={"model": MODEL, "messages": messages})).json()
        assert data["object"] == "chat.completion" and data["model"] == MODEL
        assert data["choices"][0]["message"]["content"].endswith("The answer is 3.")
        assert (
            data["usage"]["total_tokens"]
            == data["usage"]["prompt_tokens"] + data["usage"]["completion_tokens"]
        )
        assert (await client.post("/chat/completions", json={"no": "messages"})).status_code == 400
        assert (await client.get("/models")).json()["data"][0]["id"] == MODEL
    with pytest.raises(httpx.ConnectError):  # stopped on exit
        async with httpx.AsyncClient() as client:
            await client.get(f"{llm.endpoint}/models")


@pytest.mark.parametrize("mode", ["shm", "cs"])
def test_the_algorithm_learns_from_the_spans_the_agent_left(mode: str, no_leftover_processes: None) -> None:
    algorithm = run_traced_demo(mode=mode, runners=2, questions=6, progress=None)
    terse, careful = algorithm.results
    assert (terse.prompt, careful.prompt) == PROMPTS
    expected_terse = sum(1 for q in make_questions(6) if q["answer"] % 3 != 0) / 6
    assert terse.mean_reward == pytest.approx(expected_terse) and careful.mean_reward == 1.0
    assert terse.model_calls == careful.model_calls == 6
    assert careful.mean_tokens > terse.mean_tokens > 0
    assert algorithm.best == PROMPTS[1]
    # the tree of one rollout: the agent's spans, the instrumented HTTP request, the reward
    roots = {root.span.name: root for root in algorithm.example_tree}
    assert set(roots) == {"solve", "agl_async.reward"}
    solve = roots["solve"]
    assert [child.span.name for child in solve.children] == [f"chat {MODEL}", "grade"]
    chat = solve.children[0]
    assert chat.span.attributes["gen_ai.operation.name"] == "chat"
    assert chat.span.attributes["gen_ai.usage.output_tokens"] > 0
    [request] = chat.children
    assert request.span.name == "POST" and request.span.attributes.get("http.status_code") == 200


def test_demo_traced_prints_what_the_spans_told_the_algorithm() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agl_async.cli", "demo", "--traced", "--runners", "2"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "best prompt: 'Think step by step, then give the answer.'" in out
    assert "mean reward 1.000" in out
    for line in (f"chat {MODEL}", "POST", "grade", "gen_ai.usage.input_tokens=", "reward=1.0"):
        assert line in out


def test_demo_traced_without_the_sdk_says_which_extra_to_install() -> None:
    code = (
        "import sys\nsys.modules['opentelemetry'] = None\n"
        "from agl_async.cli import main\nsys.exit(main(['demo', '--traced']))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 2
    assert 'pip install "agl-async[otel]"' in result.stderr
