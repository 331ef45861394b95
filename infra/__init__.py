"""Adapters and entry points: broker, Kafka, ClickHouse, Ray, models, config, HTTP, CLI."""
