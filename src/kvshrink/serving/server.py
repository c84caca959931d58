"""transformers' OpenAI-compatible server, assembled on a prepared kvshrink model directory.

`transformers serve` builds its chat handler inside its own constructor, so a response field cannot be added to it
from outside; this module assembles the same app from the same parts (`ModelManager`, `GenerationState`, the
endpoint handlers, `build_server`, uvicorn) with `KvshrinkChatHandler` in the chat handler's place. Everything else
(templates, generation config, streaming, the other endpoints, the one inference thread per model that makes
requests run one at a time) is transformers' own. The model is loaded with `trust_remote_code` so its
`custom_generate/generate.py` becomes its `generate`.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

from .generation import build_cache
from .model_dir import ServedModel, ServeError

log = logging.getLogger("kvshrink.serve")


def require_serving() -> None:
    """ServeError unless transformers' server dependencies (FastAPI, uvicorn, openai, pydantic) are installed."""
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise ServeError("kvshrink serve needs transformers' server dependencies (fastapi, uvicorn, openai, "
                         "pydantic): pip install 'kvshrink[serve]'")


@dataclass
class App:
    """The ASGI app and what it serves."""

    app: Any
    served: ServedModel
    model: Any
    model_manager: Any


def build_app(served: ServedModel, names: tuple[str, ...] = (), device: str = "cpu", dtype: str = "auto") -> App:
    """Load the served directory in transformers' ModelManager and build transformers' app around it, with the
    kvshrink chat handler. Checks that the custom generate was bound and that the method builds a cache for the
    model, so a bad profile fails here rather than on the first request."""
    require_serving()
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.model_manager import ModelManager
    from transformers.cli.serving.response import ResponseHandler
    from transformers.cli.serving.server import build_server
    from transformers.cli.serving.systemone import SystemOneHandler
    from transformers.cli.serving.transcription import TranscriptionHandler
    from transformers.cli.serving.utils import GenerationState

    from ..models import text_config
    from .handler import KvshrinkChatHandler

    force = str(served.path)
    manager = ModelManager(device=device, dtype=dtype, trust_remote_code=True, attn_implementation="sdpa",
                           continuous_batching=False, model_timeout=-1, force_model=force)
    model, _ = manager.load_model_and_processor(manager.process_model_name(force))
    bound = model.__dict__.get("generate")
    if not (isinstance(bound, functools.partial) and "custom_generate" in getattr(bound.func, "__module__", "")):
        raise ServeError(f"transformers did not bind {served.path}/custom_generate/generate.py as the model's "
                         f"generate; kvshrink's cache would not be used")
    build_cache(model, served.spec, served.profile)  # raises on a profile for another model, a bad option, ...
    state = GenerationState(continuous_batching=False, compile=False)
    chat = KvshrinkChatHandler(model_manager=manager, generation_state=state,
                               max_tokens_limit=text_config(model).max_position_embeddings,
                               model_names=tuple(names) + (force,))
    app = build_server(
        manager, chat,
        completion_handler=CompletionHandler(model_manager=manager, generation_state=state),
        response_handler=ResponseHandler(model_manager=manager, generation_state=state),
        transcription_handler=TranscriptionHandler(manager, state),
        systemone_handler=SystemOneHandler(model_manager=manager, generation_state=state),
        generation_state=state,
    )
    return App(app, served, model, manager)


def run(app: App, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve `app` with uvicorn until interrupted (SIGINT/SIGTERM)."""
    import uvicorn

    config = uvicorn.Config(app.app, host=host, port=port, log_level=log_level)
    server = uvicorn.Server(config)
    log.info("serving %s with %s on http://%s:%d/v1/chat/completions", app.served.source, app.served.spec, host,
             port)
    server.run()
    if not server.started:  # uvicorn logs why (port taken, ...) and returns
        raise ServeError(f"the server did not start on {host}:{port} (see the log above)")

