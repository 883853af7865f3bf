"""ray_app: a self-hosted AI platform for documents and custom models, built on Ray."""

__version__ = "0.1.0"
