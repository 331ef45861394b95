"""ClickHouse: the store (chDB embedded, or a server over HTTP), its tables, its writes and
its typed reads (store.py)."""
