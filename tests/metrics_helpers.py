"""Reading a Prometheus text exposition in tests: `metric(text, name, labels)` finds one
sample by name and the labels it must carry (written as in the exposition,
'{class="online"}'), whatever other labels it has (every conserve family also carries
`model_name`)."""
from __future__ import annotations

import re

_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{([^}]*)\})? (\S+)", re.M)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def samples(text: str) -> list[tuple[str, dict, float]]:
    """Every sample: (name, labels, value)."""
    return [(m.group(1), dict(_LABEL.findall(m.group(2) or "")), float(m.group(3)))
            for m in _SAMPLE.finditer(text)]


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of the one sample of `name` carrying `labels`; fails if none or several."""
    want = dict(_LABEL.findall(labels))
    hits = [v for n, have, v in samples(text) if n == name and want.items() <= have.items()]
    assert len(hits) == 1, f"{name}{labels}: {len(hits)} samples in /metrics"
    return hits[0]
