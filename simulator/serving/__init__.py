"""LLM serving simulation: iteration costs, KV cache, schedulers, re-sharding, reports."""
