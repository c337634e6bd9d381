"""A requests progress bar for offline runs (`LLM.generate/chat(use_tqdm=True)`,
`conserve-jax run-batch`), shaped like vLLM's: "Processed prompts" with requests done out of
the total, its ETA, and the input and output tokens/s so far.

Drawn on stderr with tqdm by the thread that calls `done`; `close` ends it. With
`enabled=False` every call is a no-op, so callers need no branches.
"""
from __future__ import annotations

import sys
import time
from typing import Optional


class RequestsBar:
    def __init__(self, total: int, enabled: bool = True, desc: str = "Processed prompts",
                 initial: int = 0, stream=None) -> None:
        self._bar = None
        self._t0 = time.monotonic()
        self.prompt_tokens = 0
        self.output_tokens = 0
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="req",
                             file=stream or sys.stderr, dynamic_ncols=True, mininterval=0.5)

    def done(self, prompt_tokens: int = 0, output_tokens: int = 0, n: int = 1,
             postfix: Optional[str] = None) -> None:
        """`n` more requests finished, with these token counts."""
        self.prompt_tokens += prompt_tokens
        self.output_tokens += output_tokens
        if self._bar is None:
            return
        dt = max(time.monotonic() - self._t0, 1e-9)
        text = (f"est. speed input: {self.prompt_tokens / dt:.2f} toks/s, "
                f"output: {self.output_tokens / dt:.2f} toks/s")
        self._bar.set_postfix_str(text if postfix is None else f"{text}, {postfix}",
                                  refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "RequestsBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
