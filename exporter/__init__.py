"""MONITAUR exporter: per-client detection of model-extraction traffic, exported to Prometheus."""

__version__ = "0.1.0"
