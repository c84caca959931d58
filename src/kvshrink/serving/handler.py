"""transformers' `/v1/chat/completions` handler, with the cache's report in each response and stricter checks.

The handler is transformers' own (`ChatCompletionHandler`: chat template, generation config, streaming); this
subclass only
- tags each request's generation config with the request id, so the custom generate can file its memory report,
- adds that report to the response as the field `kvshrink` (the JSON body, or the last chunk of a stream),
- answers requests transformers would take to a 500 or an endless generation (no messages, `max_tokens` 0 or past
  the model's context) with a 400 naming the value,
- accepts the model's kvshrink name as well as the served directory in the request's `model` field.
"""
from __future__ import annotations

import contextvars
import json
from typing import Any

from transformers.cli.serving.chat_completion import ChatCompletionHandler

from .generation import REQUEST_ATTR
from .ledger import LEDGER

_REQUEST: contextvars.ContextVar[str | None] = contextvars.ContextVar("kvshrink_request", default=None)


def check_chat_body(body: dict[str, Any], max_tokens_limit: int) -> None:
    """Raise a 400 HTTPException naming the first field of a chat request transformers cannot answer well."""
    from fastapi import HTTPException

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise HTTPException(status_code=400, detail=f"'messages' must be a non-empty list of messages, got "
                                                    f"{json.dumps(messages)[:200]}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise HTTPException(status_code=400, detail=f"messages[{i}] must be an object with a string 'role', "
                                                        f"got {json.dumps(message)[:200]}")
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= max_tokens_limit:
            raise HTTPException(status_code=400, detail=f"'{key}' must be an integer from 1 to {max_tokens_limit} "
                                                        f"(the model's context), got {json.dumps(value)[:50]}")


class KvshrinkChatHandler(ChatCompletionHandler):
    """Chat completions through the served model's kvshrink cache, each response carrying its `kvshrink` report."""

    def __init__(self, *args: Any, max_tokens_limit: int, model_names: tuple[str, ...] = (), **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.max_tokens_limit = max_tokens_limit
        self.model_names = model_names

    def _validate_request(self, body: dict) -> None:
        super()._validate_request(body)
        check_chat_body(body, self.max_tokens_limit)

    async def handle_request(self, body: dict, request_id: str):
        token = _REQUEST.set(request_id)
        try:
            return await super().handle_request(body, request_id)
        finally:
            _REQUEST.reset(token)

    def _resolve_model(self, body: dict):
        if body.get("model") in self.model_names:
            body["model"] = self.model_manager.force_model
        return super()._resolve_model(body)

    def _build_generation_config(self, body: dict, model_generation_config, use_cb: bool = False):
        config = super()._build_generation_config(body, model_generation_config, use_cb=use_cb)
        setattr(config, REQUEST_ATTR, _REQUEST.get())
        return config

    def _build_completion(self, request_id: str, *args: Any, **kwargs: Any) -> dict:
        result = super()._build_completion(request_id, *args, **kwargs)
        report = LEDGER.take(request_id)
        if report is not None:
            result["kvshrink"] = report
        return result

    def _build_chunk_sse(self, request_id: str = "", **fields: Any) -> str:
        sse = super()._build_chunk_sse(request_id, **fields)
        if fields.get("finish_reason") is None:
            return sse
        report = LEDGER.take(request_id)
        if report is None:
            return sse
        chunk = json.loads(sse.removeprefix("data: "))
        chunk["kvshrink"] = report
        return f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"
