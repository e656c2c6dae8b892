"""Metrics (Prometheus), tracing (OpenTelemetry), logs and the access line."""
