"""Evaluation: corpora, tasks and measurements of quality against the uncompressed cache."""
