"""Use cases that HTTP and the CLI share: rebuild and restore from the log, the audit
trail, history (time travel), upstream ingest, the knowledge base, workflows, plugins, the
bus, the read-side queries and their rendering, and the Faust processors' worker. May
import adapters and config; never ray, http or cli."""
