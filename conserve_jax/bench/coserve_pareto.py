"""The co-serving benchmark's variants and its Pareto sweep (helpers of `coserve`, run as
scripts/bench_coserve.py; tests/test_bench_coserve.py checks the variants and dominance).

A variant is one policy with its knob: `conserve` at an isolation factor (or off),
`sarathi` at a token budget, the other policies as they are. The default set is one
variant per policy (`conserve-discard` in the policy list adds conserve with preempted
iterations discarded instead of resumed); `--sweep` adds conserve at isolation 1.05, 1.1,
1.2, 1.5, 2 and off and sarathi at token budgets 64, 128, 256 and 512. The sweep's points
are plotted as online p99 TPOT and p99 TTFT against offline processed tokens/s, one curve
per policy, and each baseline point is checked for a conserve point that dominates it (at
least its offline processed tokens/s with no worse online p99 TTFT and TPOT).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

SWEEP_ISOLATION = [1.05, 1.1, 1.2, 1.5, 2.0, None]
SWEEP_SARATHI = [64, 128, 256, 512]


@dataclass
class Variant:
    label: str  # key in the JSON's `policies` (the default variant of a policy: its name)
    policy: str
    overrides: dict = field(default_factory=dict)  # EngineConfig fields

    @property
    def isolation(self) -> Optional[float]:
        return self.overrides.get("isolation") if self.policy == "conserve" else None


def iso_label(f: Optional[float]) -> str:
    return "off" if f is None else f"{f:g}"


def variants(policies: list, isolation: Optional[float], sarathi_budget: int,
             sweep: bool, sweep_isolation: Optional[list] = None,
             sweep_sarathi: Optional[list] = None) -> list:
    """The default variant of each policy, plus (sweep) the given isolation factors and
    sarathi budgets (default: SWEEP_ISOLATION, SWEEP_SARATHI)."""
    iso_pts = SWEEP_ISOLATION if sweep_isolation is None else sweep_isolation
    sar_pts = SWEEP_SARATHI if sweep_sarathi is None else sweep_sarathi
    out = []
    for p in policies:
        if p == "conserve":
            out.append(Variant(p, p, {"isolation": isolation}))
            if sweep:
                out += [Variant(f"conserve@{iso_label(f)}", p, {"isolation": f})
                        for f in iso_pts if f != isolation]
        elif p == "conserve-discard":  # A/B: preempted iterations discarded, not resumed
            out.append(Variant(p, "conserve", {"isolation": isolation,
                                               "resume_abandoned": False}))
        elif p == "sarathi":
            out.append(Variant(p, p, {"sarathi_token_budget": sarathi_budget}))
            if sweep:
                out += [Variant(f"sarathi@{b}", p, {"sarathi_token_budget": b})
                        for b in sar_pts if b != sarathi_budget]
        else:
            out.append(Variant(p, p))
    return out


def sweep_points(vs: list, policies: dict) -> list:
    pts = []
    for v in vs:
        m = policies[v.label]
        pts.append({"label": v.label, "policy": v.policy, "isolation": iso_label(v.isolation)
                    if v.policy == "conserve" else None,
                    "sarathi_token_budget": v.overrides.get("sarathi_token_budget"),
                    **{k: m.get(k) for k in ("online_ttft_p99_s", "online_tpot_p99_s",
                                             "offline_processed_tokens_per_s",
                                             "offline_tokens_per_s", "slo_attainment")}})
    return pts


def dominance(points: list) -> dict:
    """For every non-conserve point with offline work: the conserve points that dominate it."""
    keys = ("online_ttft_p99_s", "online_tpot_p99_s", "offline_processed_tokens_per_s")
    cons = [p for p in points if p["policy"] == "conserve" and all(p[k] is not None for k in keys)]
    out = {}
    for b in points:
        if b["policy"] in ("conserve", "online-only") or any(b[k] is None for k in keys):
            continue
        dom = [c["label"] for c in cons
               if c["offline_processed_tokens_per_s"] >= b["offline_processed_tokens_per_s"]
               and c["online_ttft_p99_s"] <= b["online_ttft_p99_s"]
               and c["online_tpot_p99_s"] <= b["online_tpot_p99_s"]]
        out[b["label"]] = {"dominated_by": dom, "dominated": bool(dom)}
    return out


def plot(path: str, points: list, title: str) -> None:
    """Two panels (p99 TPOT, p99 TTFT vs offline processed tokens/s), a curve per policy,
    online-only drawn as a horizontal line with its 1.2x band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    by_policy: dict = {}
    for p in points:
        by_policy.setdefault(p["policy"], []).append(p)
    for ax, key, name in ((axes[0], "online_tpot_p99_s", "online p99 TPOT (s)"),
                          (axes[1], "online_ttft_p99_s", "online p99 TTFT (s)")):
        for i, (pol, pts) in enumerate(sorted(by_policy.items())):
            pts = [p for p in pts if p[key] is not None
                   and p["offline_processed_tokens_per_s"] is not None]
            if not pts:
                continue
            if pol == "online-only":
                y = pts[0][key]
                ax.axhline(y, color="k", ls="--", lw=1, label="online-only")
                ax.axhline(1.2 * y, color="gray", ls=":", lw=1, label="1.2 x online-only")
                continue
            pts.sort(key=lambda p: p["offline_processed_tokens_per_s"])
            xs = [p["offline_processed_tokens_per_s"] for p in pts]
            ys = [p[key] for p in pts]
            ax.plot(xs, ys, marker="o", label=pol, color=f"C{i}")
            for p, x, y in zip(pts, xs, ys):
                tag = p["isolation"] if pol == "conserve" else p["sarathi_token_budget"]
                if tag is not None:
                    ax.annotate(str(tag), (x, y), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel("offline processed tokens/s (prefill + decode committed)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
