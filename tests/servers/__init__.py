"""The server suite (`make test-servers`): the production path, Apache Kafka (KRaft) and a
ClickHouse server started by testcontainers, under the same test bodies as the embedded
default. Where no container engine answers, it is skipped with one line that says so."""
