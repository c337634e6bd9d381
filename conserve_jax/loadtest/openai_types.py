"""Plain result types of the load tester's OpenAI backend (`openai_backend`,
`openai_flex`): the shapes `ClientAdapter` reads (token_ids / finished / finish_reason,
batch state and counts, per-item results) and `HttpError`, whose `code()` the report
groups failures by. No behaviour; any thread."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


class HttpError(Exception):
    """A non-2xx answer; `code()` is the HTTP status as text (the report groups by it)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message

    def code(self) -> str:
        return f"HTTP_{self.status}"

    def details(self) -> str:
        return self.message


@dataclass
class Chunk:
    token_ids: list[int]
    finished: bool = False
    finish_reason: Optional[str] = None


@dataclass
class BatchInfo:
    batch_id: str
    state: str
    total: int = 0
    done: int = 0
    failed: int = 0


@dataclass
class BatchResult:
    index: int
    token_ids: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
