"""Everything that touches the world, by role (each package's docstring says what it may
import; the layers are an import-linter contract in pyproject.toml, checked by CI):

- cli/, http/: the entry points (the `chatllm` commands; the FastAPI app).
- client.py: the Python client users import (ChatClient).
- runtime.py: the composition root that starts a stack (broker, Ray, shards, workers).
- wiring.py: the builders the root and the Ray hosts share (a worker, a store, plugins).
- ray/: what Ray hosts (the shard, the store host), their facade and leases.
- services/: the use cases HTTP and the CLI share (rebuild, audit, ingest, workflows …).
- adapters/: one home per technology (kafka/, clickhouse/, models, embeddings, metrics,
  tracing, the clock, the in-memory adapters for tests).
- config.py, gcpolicy.py: settings and the collector policy; they import nothing of infra.
"""
