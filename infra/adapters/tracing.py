"""OpenTelemetry: the trace context of each request flows from HTTP through the shard into
every event (trace_id, span_id); spans are exported over OTLP/HTTP when configured."""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

log = logging.getLogger(__name__)

_installed = False


def setup_tracing(otlp_endpoint: str, service_name: str, export_delay_ms: int = 1000) -> None:
    """With an OTLP endpoint, install the SDK tracer provider for this process (once).

    Without one, nothing is installed: spans stay no-ops (no cost on the request path), the
    trace id still comes from the caller's traceparent, and events get their own span ids.
    """
    global _installed
    if _installed or not otlp_endpoint:
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=otlp_endpoint.rstrip("/") + "/v1/traces")
        provider.add_span_processor(
            BatchSpanProcessor(exporter, schedule_delay_millis=export_delay_ms)
        )
        log.info("exporting spans to %s", otlp_endpoint)
    trace.set_tracer_provider(provider)
    _installed = True


def shutdown_tracing() -> None:
    """Flush the spans not yet exported."""
    provider: Any = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()


def tracer() -> trace.Tracer:
    return trace.get_tracer("chat-llm")


def hex_ids(span: trace.Span) -> tuple[str, str]:
    """(trace_id, span_id) of a span as W3C hex."""
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def remote_parent(trace_id: str, span_id: str) -> Any:
    """A context whose current span is the caller's span in another process."""
    if not trace_id or not span_id:
        return None
    parent = SpanContext(
        trace_id=int(trace_id, 16),
        span_id=int(span_id, 16),
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    return trace.set_span_in_context(NonRecordingSpan(parent))
