"""`aurora-jax serve`: the OpenAI-compatible HTTP front end, its serving loop and its metrics.

- config.py: ServeConfig (YAML + overrides, configs/serve.yaml);
- loop.py: the engine's own thread, continuous batching, cancellation, shutdown;
- text.py: incremental detokenization and stop strings;
- api.py: request bodies checked field by field, OpenAI error objects;
- app.py: the FastAPI app (completions, chat, models, health, metrics, admin);
- metrics.py: the Prometheus metrics;
- server.py: assembly and uvicorn.
"""
