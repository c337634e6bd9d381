"""Helpers for the HTTP-front tests: an in-process server (gRPC + OpenAI HTTP on loopback,
MockEngine) and official `openai` clients pointed at it."""
from __future__ import annotations

import urllib.request

import openai

from tests.conftest_server import RunningServer, start_server

TOKEN_A, TOKEN_B = "tok-tenant-a", "tok-tenant-b"
MODEL = "mock"


def start_http_server(data_dir, **config) -> RunningServer:
    config.setdefault("http_port", 0)
    config.setdefault("served_model_name", MODEL)
    return start_server(data_dir, **config)


def base_url(srv: RunningServer) -> str:
    return f"http://127.0.0.1:{srv.app.http_port}/v1"


def client(srv: RunningServer, token: str = TOKEN_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url(srv), api_key=token, max_retries=0, timeout=30)


def raw(srv: RunningServer, method: str, path: str, body: bytes | None = None,
        token: str | None = TOKEN_A, port: int | None = None) -> tuple[int, bytes, dict]:
    """(status, body, headers) of a plain HTTP request (no client library in between)."""
    url = f"http://127.0.0.1:{port or srv.app.http_port}{path}"
    req = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)
