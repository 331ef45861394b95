"""The floor under the gateway benchmark: the least any implementation of the request path
can do on this stack. A raw ASGI app (no FastAPI, no validation, no events of its own) on
the same uvicorn + uvloop + httptools server, whose every POST makes exactly what the
issue's target allows for: one awaited Ray actor call (a no-op) and one acks=all produce,
then answers a fixed body. Whatever the gateway measures above this is its own work.

Run by bench_gateway as `python -m benchmarks.floor_app PORT BOOTSTRAP`.
"""

from __future__ import annotations

import sys
from typing import Any

from benchmarks.common import read_body

_BODY = b'{"object":"chat.completion","choices":[]}'


class _Noop:
    async def ping(self) -> int:
        return 1


def build(bootstrap: str) -> Any:
    import ray
    from aiokafka import AIOKafkaProducer

    state: dict[str, Any] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
                    actor = ray.remote(_Noop).options(num_cpus=0).remote()  # type: ignore[attr-defined]
                    await actor.ping.remote()
                    producer = AIOKafkaProducer(
                        bootstrap_servers=bootstrap, acks="all", linger_ms=0
                    )
                    await producer.start()
                    state.update(actor=actor, producer=producer)
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await state["producer"].stop()
                    ray.shutdown()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["path"] == "/healthz":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        body = await read_body(receive)
        await state["actor"].ping.remote()
        await state["producer"].send_and_wait("bench-floor", body, key=b"k")
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": _BODY})

    return app


def main(argv: list[str]) -> None:
    import uvicorn

    port, bootstrap = int(argv[0]), argv[1]
    uvicorn.run(
        build(bootstrap),
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        lifespan="on",
    )


if __name__ == "__main__":
    main(sys.argv[1:])
