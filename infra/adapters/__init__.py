"""Adapters: one home per technology, each behind a port of actors/ or streams/ or a typed
surface of its own. kafka/ (aiokafka clients and the embedded tansu broker), clickhouse/
(the store: SQL, migrations, typed reads), models (the demo model and any OpenAI-compatible
API), embeddings, sentiment, metrics, tracing, the clock, and the in-memory adapters that
unit tests use. May import events, actors, streams and infra.config; never services, ray,
http or cli."""
