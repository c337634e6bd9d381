"""`PgFileStore`: the OpenAI Files API's files and batch documents in the PostgreSQL batch
store's database (tables `files` and `docs`, migration 4 of `batch/pg_schema.py`), so every
replica of a fleet serves every file. Same interface and rows as `files.FileStore`.

Threading: any thread; each call is one transaction on the batch store's pool. An
unreachable database raises `StoreUnavailable` (HTTP 503). Creating a file under an id that
exists keeps the first one (two replicas rendering the same batch output at once).
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Optional

from conserve_server.openai_api.files import FileRow

_COLS = "id, tenant, filename, purpose, bytes, created_at"


class PgFileStore:
    def __init__(self, store) -> None:
        """`store`: an open `PgBatchStore` (its pool and schema)."""
        self.store = store

    def create(self, tenant: str, filename: str, purpose: str, data: bytes,
               file_id: Optional[str] = None) -> FileRow:
        row = FileRow(file_id or "file-" + uuid.uuid4().hex, tenant, filename, purpose,
                      len(data), int(time.time()))
        with self.store.transaction() as cur:
            cur.execute(f"INSERT INTO files ({_COLS}, data) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                        "ON CONFLICT (id) DO NOTHING",
                        (row.id, tenant, filename, purpose, row.bytes, row.created_at, data))
        return self.get(row.id) or row

    def get(self, file_id: str) -> Optional[FileRow]:
        got = self.store.read(lambda c: c.execute(f"SELECT {_COLS} FROM files WHERE id=%s",
                                                  (file_id,)).fetchone())
        return FileRow(*got) if got else None

    def content(self, file_id: str) -> bytes:
        got = self.store.read(lambda c: c.execute("SELECT data FROM files WHERE id=%s",
                                                  (file_id,)).fetchone())
        if got is None:
            raise FileNotFoundError(file_id)
        return bytes(got[0])

    def delete(self, file_id: str) -> bool:
        with self.store.transaction() as cur:
            return cur.execute("DELETE FROM files WHERE id=%s", (file_id,)).rowcount > 0

    def list(self, tenant: Optional[str], purpose: Optional[str] = None) -> list[FileRow]:
        sql, args = f"SELECT {_COLS} FROM files WHERE TRUE", []
        if tenant is not None:
            sql, args = sql + " AND tenant=%s", args + [tenant]
        if purpose is not None:
            sql, args = sql + " AND purpose=%s", args + [purpose]
        rows = self.store.read(lambda c: c.execute(
            sql + " ORDER BY created_at DESC, id DESC", args).fetchall())
        return [FileRow(*r) for r in rows]

    def put_doc(self, key: str, doc: dict) -> None:
        with self.store.transaction() as cur:
            cur.execute("INSERT INTO docs (key, doc) VALUES (%s, %s) "
                        "ON CONFLICT (key) DO UPDATE SET doc=EXCLUDED.doc", (key, json.dumps(doc)))

    def get_doc(self, key: str) -> Optional[dict]:
        got = self.store.read(lambda c: c.execute("SELECT doc FROM docs WHERE key=%s",
                                                  (key,)).fetchone())
        return json.loads(got[0]) if got else None
