"""The OpenAI Files and Batch API across two in-process replicas sharing one PostgreSQL
batch store: a file uploaded to one and a batch created there are served by the other
(batch status, output file), with tenant isolation."""
from __future__ import annotations

import openai
import pytest

from tests.openai_helpers import TOKEN_A, TOKEN_B, client, start_http_server
from tests.pg_cluster import pg_cluster, pg_url  # noqa: F401  (fixtures)
from tests.test_openai_batches import chat_line, jsonl, lines_of, wait_status


def test_files_and_batches_on_every_replica(pg_url, tmp_path):
    a = start_http_server(tmp_path / "a", batch_store=pg_url, auth_tokens=[TOKEN_A, TOKEN_B])
    b = start_http_server(tmp_path / "b", batch_store=pg_url, auth_tokens=[TOKEN_A, TOKEN_B])
    try:
        ca, cb = client(a), client(b)
        f = ca.files.create(file=jsonl([chat_line(i, f"q{i}") for i in range(6)]), purpose="batch")
        assert cb.files.retrieve(f.id).bytes == f.bytes
        assert cb.files.content(f.id).text.count("\n") == 6
        batch = ca.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"job": "fleet"})
        done = wait_status(cb, batch.id, {"completed"}, timeout=60)
        assert done.metadata == {"job": "fleet"} and done.request_counts.completed == 6
        out_b = lines_of(cb, done.output_file_id)
        out_a = lines_of(ca, done.output_file_id)
        assert [x["custom_id"] for x in out_b] == [f"req-{i}" for i in range(6)] and out_a == out_b
        other = client(b, TOKEN_B)  # another tenant sees neither the file nor the batch
        with pytest.raises(openai.NotFoundError):
            other.files.retrieve(f.id)
        with pytest.raises(openai.NotFoundError):
            other.batches.retrieve(batch.id)
        assert f.id in [x.id for x in cb.files.list().data]
        assert [x.id for x in other.files.list().data] == []
    finally:
        a.stop()
        b.stop()
