"""What Ray hosts: the chat shard (contexts, limiter, router: shard.py) and its direct
connection (shardlink.py), the gateway facade the API calls (gateway.py), the shard leases
that fence a stale writer (lease.py), and the store host that runs the projection worker
(storehost.py). May import services, wiring, adapters and config; never http or cli."""
