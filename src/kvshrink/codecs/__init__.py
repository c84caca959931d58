"""Codecs: how compressed keys and values are stored as bytes."""
