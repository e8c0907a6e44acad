"""Aggregates per-user source files in an object store and serves them over GraphQL."""

__version__ = "0.1.0"
