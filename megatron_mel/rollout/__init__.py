"""Rollout engines (embedded, SGLang, vLLM) behind one interface, and weight sync into them."""
