"""Adapter lifecycle: the content-addressed adapter store and the `adapters` topic events."""
