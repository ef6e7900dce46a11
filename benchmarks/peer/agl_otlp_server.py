"""Agent-Lightning 0.3.0's store server for benchmarks/otlp.py (run by ITS interpreter, never ours).

    LITELLM_LOCAL_MODEL_COST_MAP=True /work/peer-venv/bin/python benchmarks/peer/agl_otlp_server.py \
        --port 4747 --attempts 64

Self-contained on purpose (agentlightning and the standard library only). Serves its
InMemoryLightningStore behind its LightningStoreServer (asyncio launch mode, as its ``agl store``
command) on 127.0.0.1:PORT, after starting ``--attempts`` rollouts. Then it speaks JSON lines on
stdin/stdout, as benchmarks/otlp.py's own server process does:

* first it prints ``{"port": ..., "attempts": [[rollout_id, attempt_id], ...]}``;
* ``count`` answers ``{"spans": <spans stored so far>}``;
* end of stdin stops the server and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


async def main(port: int, attempts: int) -> None:
    logging.disable(logging.WARNING)
    from agentlightning.store.client_server import LightningStoreServer
    from agentlightning.store.memory import InMemoryLightningStore

    store = InMemoryLightningStore()
    started = [await store.start_rollout(input={"i": i}) for i in range(attempts)]
    server = LightningStoreServer(store, host="127.0.0.1", port=port, launch_mode="asyncio")
    await server.start()
    ids = [[r.rollout_id, r.attempt.attempt_id] for r in started]
    print(json.dumps({"port": port, "attempts": ids}), flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        if line.strip() == "count":
            total = 0
            for rollout_id, _ in ids:
                total += len(await store.query_spans(rollout_id))
            print(json.dumps({"spans": total}), flush=True)
    await server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--attempts", type=int, default=64)
    args = parser.parse_args()
    asyncio.run(main(args.port, args.attempts))
