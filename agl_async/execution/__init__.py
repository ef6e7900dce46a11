"""Execution strategies: shared-memory (anyio task group) and client-server (processes)."""
