"""Serving: an OpenAI-compatible HTTP server with continuous batching and per-request adapter stacks.

Layers, bottom up: `text` (tokens to streamed text, stop strings), `engine` (the slot KV cache,
prefill and CUDA-graph decode steps, per-row sampling), `adapters` (every served adapter applied
per row in one batch), `scheduler` (the thread that admits, decodes and retires sequences),
`protocol` (OpenAI request models, errors, response and chunk shapes), `service` (model ids,
stacks, templates: requests to sequences), `app` (FastAPI routes, the API-key and body-size gate),
`command` (`tinygpt serve`). `static/index.html` is the chat page.
"""
