"""Serving: transformers' OpenAI-compatible server answering through a fresh kvshrink cache per request.

`kvshrink serve` prepares a model directory whose `custom_generate/generate.py` builds the cache (`model_dir`,
`generation`), then runs transformers' server on it with a chat handler that reports each request's cache in the
response (`handler`, `server`, `ledger`). See docs/serve.md.
"""
from .command import method_spec, prepare, serve
from .model_dir import ServedModel, ServeError, prepare_model_dir

__all__ = ["ServeError", "ServedModel", "method_spec", "prepare", "prepare_model_dir", "serve"]
