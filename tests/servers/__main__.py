"""`make test-servers`: start Apache Kafka (KRaft, one broker) and a ClickHouse server with
testcontainers, then run the server suite against them (the same test bodies as the
embedded default, pointed at the servers by CHATLLM_TEST_BOOTSTRAP and
CHATLLM_TEST_CLICKHOUSE_URL). Without a container engine: one line, exit 0."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.servers.engine import find_engine

KAFKA_IMAGE = "confluentinc/cp-kafka:7.8.0"
CLICKHOUSE_IMAGE = "clickhouse/clickhouse-server:24.8"

SERVER_SUITE = [
    # Every port contract test (EventSink, StreamReader, ArchiveSink and the read side).
    "tests/integration/test_contracts.py",
    "tests/integration/test_store.py",
    # The worker SIGKILLed between writing and committing: the fold holds.
    "tests/faults/test_worker_crash.py",
    # A rebuild from the archive and from the broker's log.
    "tests/integration/test_rebuild.py",
    # The e2e slice: `chatllm up` with broker.bootstrap_servers and clickhouse.url set.
    "tests/e2e/test_slice.py",
]


def main() -> int:
    address, why = find_engine()
    if address is None:
        print(f"skipped: {why}")
        return 0
    os.environ.setdefault("DOCKER_HOST", address)
    from testcontainers.community.clickhouse import ClickHouseContainer
    from testcontainers.community.kafka import KafkaContainer

    with (
        KafkaContainer(KAFKA_IMAGE).with_kraft() as kafka,
        ClickHouseContainer(CLICKHOUSE_IMAGE) as clickhouse,
    ):
        host = clickhouse.get_container_host_ip()
        port = clickhouse.get_exposed_port(8123)
        url = f"http://{clickhouse.username}:{clickhouse.password}@{host}:{port}"
        env = {
            **os.environ,
            "CHATLLM_TEST_BOOTSTRAP": kafka.get_bootstrap_server(),
            "CHATLLM_TEST_CLICKHOUSE_URL": url,
        }
        print(f"kafka at {env['CHATLLM_TEST_BOOTSTRAP']}, clickhouse at {host}:{port}")
        command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *SERVER_SUITE]
        return subprocess.run([*command, *sys.argv[1:]], env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
