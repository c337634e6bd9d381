"""vLLM's small surface on the HTTP front (issue 29, item 8): GET /version, POST /tokenize
and /detokenize in vLLM's shapes, and the `priority` body field. A real in-process server
(gRPC + HTTP on loopback) over the mock engine, with auth on."""
from __future__ import annotations

import json

import openai
import pytest

from conserve_server.openai_api.tokenize import package_version
from tests.openai_helpers import MODEL, TOKEN_A, TOKEN_B, client, raw, start_http_server

MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Why is the sky blue? ünïcødé ✓"}]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = start_http_server(tmp_path_factory.mktemp("data"), auth_tokens=[TOKEN_A, TOKEN_B])
    yield s
    s.stop()


def _post(srv, path, body, token=TOKEN_A):
    status, data, _ = raw(srv, "POST", path, json.dumps(body).encode(), token=token)
    return status, json.loads(data)


def test_version_without_auth(srv):
    status, data, _ = raw(srv, "GET", "/version", token=None)
    assert status == 200 and json.loads(data) == {"version": package_version()}
    assert package_version() != ""


def test_tokenize_a_prompt_in_vllms_shape(srv):
    status, body = _post(srv, "/tokenize", {"model": MODEL, "prompt": "héllo wörld"})
    assert status == 200
    assert set(body) == {"count", "max_model_len", "tokens", "token_strs"}
    assert body["tokens"] == srv.engine.tokenizer.encode("héllo wörld")
    assert body["count"] == len(body["tokens"]) and body["token_strs"] is None
    assert body["max_model_len"] == srv.engine.max_model_len
    status, back = _post(srv, "/detokenize", {"model": MODEL, "tokens": body["tokens"]})
    assert status == 200 and back == {"prompt": "héllo wörld"}


def test_tokenize_messages_counts_what_a_chat_completion_would(srv):
    status, body = _post(srv, "/tokenize", {"messages": MESSAGES})  # model is optional
    assert status == 200
    answer = client(srv).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
    assert body["count"] == answer.usage.prompt_tokens
    status, no_gen = _post(srv, "/tokenize", {"messages": MESSAGES,
                                              "add_generation_prompt": False})
    assert status == 200 and 0 < no_gen["count"] < body["count"]
    assert body["tokens"][:no_gen["count"]] == no_gen["tokens"]


def test_token_strs_on_request(srv):
    status, body = _post(srv, "/tokenize", {"prompt": "ab", "return_token_strs": True})
    assert status == 200 and body["token_strs"] == ["a", "b"]


@pytest.mark.parametrize("path,body,param", [
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"messages": []}, "messages"),
    ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ("/tokenize", {"prompt": "x", "add_special_tokens": "yes"}, "add_special_tokens"),
    ("/tokenize", {"prompt": "x", "messages": MESSAGES}, "prompt"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
    ("/detokenize", {"tokens": [1, -1]}, "tokens"),
    ("/detokenize", {"tokens": [10 ** 9]}, "tokens"),
])
def test_bad_input_is_a_400_naming_the_field(srv, path, body, param):
    status, err = _post(srv, path, body)
    assert status == 400 and err["error"]["param"] == param, err


def test_unknown_model_and_missing_token(srv):
    status, err = _post(srv, "/tokenize", {"model": "other", "prompt": "x"})
    assert status == 404 and err["error"]["code"] == "model_not_found"
    status, _ = _post(srv, "/tokenize", {"prompt": "x"}, token=None)
    assert status == 401
    status, _ = _post(srv, "/detokenize", {"tokens": [70]}, token="wrong")
    assert status == 401


def test_priority_is_accepted_and_checked(srv):
    c = client(srv)
    out = c.chat.completions.create(model=MODEL, messages=MESSAGES[1:], max_tokens=4,
                                    extra_body={"priority": -5})
    assert out.choices[0].message.content
    out = c.completions.create(model=MODEL, prompt="abc", max_tokens=3,
                               extra_body={"priority": 10})
    assert out.choices[0].text == "abc"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt="abc", max_tokens=3,
                             extra_body={"priority": "high"})
    assert e.value.body["param"] == "priority"
