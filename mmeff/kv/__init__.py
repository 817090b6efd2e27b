"""The LLM's KV cache: the evicting cache and its presses (``presses``: full, StreamingLLM) and SepLLM
(``sepllm``). The hooks that make a host model use them live in :mod:`mmeff.adapters.kv_cache`."""
