"""Injected backends: training backends, dataset sources, artifact store, registry, telemetry."""
