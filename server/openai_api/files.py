"""`FileStore`: durable files of the OpenAI Files API (batch inputs, rendered batch outputs)
and small JSON documents (the OpenAI-side metadata of a batch), under `<data_dir>/files/`.

Each file is `<id>.data` (the bytes) plus `<id>.json` (its metadata: owner tenant,
filename, purpose, size, creation time). Both are written to a temporary name, fsynced and
renamed, metadata last, so a file either exists completely or not at all after a crash.
Batch jobs themselves live in the batch store; this store only keeps what the OpenAI shape
needs around them. With a shared (PostgreSQL) batch store, `front.open_file_store` gives
`pg_files.PgFileStore` instead, in the same database, so every replica serves every file.

Threading: any thread (HTTP worker threads). Writes of distinct ids never touch the same
paths; the directory listing is read without a lock (rename is atomic).
"""
from __future__ import annotations

import json
import os
import re
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Optional

_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


@dataclass
class FileRow:
    id: str
    tenant: str
    filename: str
    purpose: str
    bytes: int
    created_at: int

    def to_openai(self) -> dict:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "expires_at": None, "status_details": None}


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class FileStore:
    def __init__(self, data_dir: str) -> None:
        self.dir = os.path.join(data_dir, "files")
        os.makedirs(self.dir, exist_ok=True)

    def _path(self, ident: str, ext: str) -> Optional[str]:
        return os.path.join(self.dir, f"{ident}.{ext}") if _ID.match(ident) else None

    def create(self, tenant: str, filename: str, purpose: str, data: bytes,
               file_id: Optional[str] = None) -> FileRow:
        """Store a file (a fresh id unless `file_id` is given) and return its row."""
        row = FileRow(file_id or "file-" + uuid.uuid4().hex, tenant, filename, purpose,
                      len(data), int(time.time()))
        _write_atomic(self._path(row.id, "data"), data)
        _write_atomic(self._path(row.id, "json"), json.dumps(asdict(row)).encode())
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the renames themselves survive power loss
        finally:
            os.close(dir_fd)
        return row

    def get(self, file_id: str) -> Optional[FileRow]:
        path = self._path(file_id, "json")
        if path is None or not os.path.exists(path):
            return None
        with open(path, "rb") as f:
            return FileRow(**json.loads(f.read()))

    def content(self, file_id: str) -> bytes:
        with open(self._path(file_id, "data"), "rb") as f:
            return f.read()

    def delete(self, file_id: str) -> bool:
        if self.get(file_id) is None:
            return False
        for ext in ("json", "data"):  # metadata first: a half-deleted file is invisible
            try:
                os.remove(self._path(file_id, ext))
            except FileNotFoundError:
                pass
        return True

    def list(self, tenant: Optional[str], purpose: Optional[str] = None) -> list[FileRow]:
        """Files of `tenant` (None: every tenant's), newest first; documents excluded."""
        rows = []
        for name in os.listdir(self.dir):
            if name.endswith(".json") and name.startswith("file-"):
                row = self.get(name[:-5])
                if row and (tenant is None or row.tenant == tenant) and (
                        purpose is None or row.purpose == purpose):
                    rows.append(row)
        rows.sort(key=lambda r: (r.created_at, r.id), reverse=True)
        return rows

    # ---- JSON documents (batch metadata) ----------------------------------------------
    def put_doc(self, key: str, doc: dict) -> None:
        _write_atomic(self._path("doc-" + key, "json"), json.dumps(doc).encode())

    def get_doc(self, key: str) -> Optional[dict]:
        path = self._path("doc-" + key, "json")
        if path is None or not os.path.exists(path):
            return None
        with open(path, "rb") as f:
            return json.loads(f.read())

