"""vLLM's utility endpoints, in vLLM's shapes:

    GET  /version     -> {"version": "<conserve-jax version>"}           (no auth, like /health)
    POST /tokenize    {"prompt": str, "add_special_tokens": true}
                   or {"messages": [...], "add_generation_prompt": true}
                      (optional "model", "return_token_strs")
                      -> {"count", "max_model_len", "tokens", "token_strs"}
    POST /detokenize  {"tokens": [int, ...]} (optional "model") -> {"prompt": str}

Chat messages are checked and rendered exactly as POST /v1/chat/completions renders them
(`conserve_server.convert.prompt_token_ids`), so `count` is the prompt length a chat request
would have. Bad input is a 400 naming the field; an unknown `model` a 404. Tokenizing runs
in the routes' worker threads; the tokenizer is thread-safe by the engine contract.
"""
from __future__ import annotations

import importlib.metadata
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from conserve_jax.proto_gen.conserve.v1 import conserve_pb2 as pb
from conserve_server import convert
from conserve_server.openai_api.errors import ApiError, bad_request, invalid_value
from conserve_server.openai_api.schemas import _bool, _is_int, _messages


def package_version() -> str:
    """The installed conserve-jax version ("unknown" when run from a bare source tree)."""
    try:
        return importlib.metadata.version("conserve-jax")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


class TokenizeRoutes:
    """The three endpoints over an `OpenAIRoutes` (its engine, auth, model name, body
    limits and worker threads)."""

    def __init__(self, routes) -> None:
        self.routes = routes

    def _model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None:
            if not isinstance(model, str):
                raise invalid_value("model", f"model must be a string, got {model!r}")
            self.routes.check_model(model)

    async def version(self, request: Request):
        return JSONResponse({"version": package_version()})

    async def tokenize(self, request: Request):
        r = self.routes
        r.tenant(request)
        body = _object(await r.json_body(request))
        self._model(body)
        strs = bool(_bool(body, "return_token_strs"))
        if "messages" in body:
            if "prompt" in body:
                raise invalid_value("prompt", "give prompt or messages, not both")
            req = pb.GenerateRequest(messages=_messages(body))
            gen_prompt = _bool(body, "add_generation_prompt")
            tokens = await r.run(self._chat_tokens, req, True if gen_prompt is None else gen_prompt)
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise invalid_value("prompt", "prompt must be a string (or send messages)")
            special = _bool(body, "add_special_tokens")
            tokens = await r.run(r.engine.tokenizer.encode, prompt,
                                 True if special is None else special)
        tokens = [int(t) for t in tokens]
        token_strs = None
        if strs:
            tok = r.engine.tokenizer
            one = getattr(tok, "id_to_token", None) or (lambda t: tok.decode([t], False))
            token_strs = [one(t) for t in tokens]
        return JSONResponse({"count": len(tokens), "max_model_len": r.engine.max_model_len,
                             "tokens": tokens, "token_strs": token_strs})

    def _chat_tokens(self, req: pb.GenerateRequest, add_generation_prompt: bool) -> list[int]:
        tok = self.routes.engine.tokenizer
        try:
            if add_generation_prompt:  # exactly what a chat completion's prompt would be
                return convert.prompt_token_ids(req, tok)[0]
            convert.prompt_token_ids(req, tok)  # the same checks (roles, control tokens)
            messages = [{"role": m.role, "content": m.content} for m in req.messages.messages]
            text = tok.apply_chat_template(messages, add_generation_prompt=False)
            return text if not isinstance(text, str) else tok.encode(text, add_special_tokens=False)
        except ValueError as e:
            raise ApiError(400, str(e), "messages", "invalid_value") from None

    async def detokenize(self, request: Request):
        r = self.routes
        r.tenant(request)
        body = _object(await r.json_body(request))
        self._model(body)
        tokens = body.get("tokens")
        vocab = r.engine.vocab_size
        if not isinstance(tokens, list) or not all(_is_int(t) for t in tokens):
            raise invalid_value("tokens", "tokens must be a list of token ids")
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            raise invalid_value("tokens", f"tokens has ids outside the vocabulary [0, {vocab}): "
                                          f"{bad[:5]}")
        text = await r.run(r.engine.tokenizer.decode, tokens)
        return JSONResponse({"prompt": text})
