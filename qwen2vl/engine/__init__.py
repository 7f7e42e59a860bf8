"""The serving engine: it takes a loaded model and runs requests to completion in token ids.

``config`` holds the engine's settings; ``llm_engine`` is the core loop (scheduler, model runner, sampler, KV and
prefix caches; ``chunked_prefill``: a long prompt's prefill in pieces between decode steps); ``output_processor``
alone turns ids into text; ``async_engine`` runs the loop on a thread of its own for servers. Nothing here
tokenizes prompts or knows about HTTP."""
