"""Bearer-token authentication: each token in the token file is its own tenant.

The token file holds one token per line; blank lines and lines starting with '#' are
ignored. A tenant id is derived from the token's SHA-256, so it is stable across restarts
and reorderings of the file, and tokens are never stored in the batch database.
Immutable after construction; `tenant` is called from any gRPC worker thread.
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Optional, Sequence


def read_tokens(path: str) -> list[str]:
    """The tokens of a token file; raises ValueError if it holds none."""
    with open(path, encoding="utf-8") as f:
        tokens = [ln.strip() for ln in f]
    tokens = [t for t in tokens if t and not t.startswith("#")]
    if not tokens:
        raise ValueError(f"{path} holds no tokens")
    return tokens


def tenant_id(token: str) -> str:
    return "t_" + hashlib.sha256(token.encode()).hexdigest()[:24]


class Authenticator:
    def __init__(self, tokens: Iterable[str]) -> None:
        self._by_digest = {hashlib.sha256(t.encode()).digest(): tenant_id(t) for t in tokens}
        if not self._by_digest:
            raise ValueError("the auth token file holds no tokens")

    @property
    def num_tenants(self) -> int:
        return len(self._by_digest)

    @classmethod
    def from_file(cls, path: str) -> "Authenticator":
        return cls(read_tokens(path))

    def tenant(self, metadata: Optional[Sequence[tuple[str, str]]]) -> Optional[str]:
        """The tenant of a call's `authorization: Bearer <token>` metadata, or None."""
        for key, value in metadata or ():
            if key.lower() != "authorization" or not isinstance(value, str):
                continue
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                # compare digests, not tokens: lookup time does not depend on the secret
                return self._by_digest.get(hashlib.sha256(token.strip().encode()).digest())
        return None
