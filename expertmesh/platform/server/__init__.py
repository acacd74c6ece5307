"""The HTTP server: an OpenAI-compatible FastAPI app over the engine, deployed with Ray Serve.

- `async_engine`: the engine thread and per-request async streams
- `protocol`, `errors`, `middleware`: request bodies, OpenAI-style errors, keys and size limits
- `app`: the routes; `lora`: the LoRA adapters served by name; `health`: the cached readiness check;
  `metrics`: Prometheus; `dashboard`: the expert-load page (`dashboard.html`)
- `serve_app`: the Ray Serve deployment; `runner`: what `expertmesh serve` runs
"""
