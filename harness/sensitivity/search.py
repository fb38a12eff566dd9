"""Which groups to keep in fp32, from measured APs: the ranking of groups by AP recovered
per fp32 GFLOP, and the greedy search that adds groups in that order (re-measuring each
combined set, since recoveries do not simply add up) until ΔAP is within the limit.
Pure functions: the APs come from a `measure` callable.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

from harness.errors import UserError

ORDERS = ("per-gflop", "recovered")


@dataclass(frozen=True)
class DeltaLimit:
    """The ΔAP a mixed-precision model may lose against fp32: absolute AP (`0.005`) or a
    fraction of what the all-quantized model loses (`50%`: recover at least half)."""

    value: float
    relative: bool = False

    @classmethod
    def parse(cls, text: str) -> "DeltaLimit":
        raw = str(text).strip()
        relative = raw.endswith("%")
        try:
            value = float(raw[:-1] if relative else raw)
        except ValueError:
            raise UserError(f"--max-delta-ap takes an AP difference (0.005) or a share of the "
                            f"quantized model's ΔAP (50%), got {text!r}") from None
        if value < 0 or (relative and value > 100):
            raise UserError(f"--max-delta-ap must be >= 0 (and at most 100%), got {text!r}")
        return cls(value / 100 if relative else value, relative)

    def absolute(self, quantized_loss: float) -> float:
        """The limit in AP, given the all-quantized model's loss (AP fp32 − AP quantized)."""
        return self.value * max(quantized_loss, 0.0) if self.relative else self.value

    def describe(self) -> str:
        return f"{self.value * 100:g} % of the quantized ΔAP" if self.relative \
            else f"{self.value:g} AP"


@dataclass(frozen=True)
class Ranked:
    """One group's single-group measurement: AP with it alone in fp32, what that recovers
    over the all-quantized AP, and that per fp32 GFLOP (None for a group without FLOPs)."""

    name: str
    AP: float
    recovered: float
    gflops: float
    recovered_per_gflop: Optional[float]
    rank: int


def rank_groups(single_ap: Mapping[str, float], gflops: Mapping[str, float],
                ap_quantized: float) -> list[Ranked]:
    """Groups best first: by recovered per GFLOP, then by recovered, then by name."""
    rows = []
    for name, ap in single_ap.items():
        recovered = ap - ap_quantized
        cost = gflops.get(name, 0.0)
        rows.append((name, ap, recovered, cost, recovered / cost if cost > 0 else None))
    rows.sort(key=lambda r: (-(r[4] if r[4] is not None else r[2] * 1e9), -r[2], r[0]))
    return [Ranked(n, ap, rec, cost, per, i + 1)
            for i, (n, ap, rec, cost, per) in enumerate(rows)]


def greedy_order(ranked: Sequence[Ranked], order: str = "per-gflop") -> list[str]:
    """The candidates of the greedy search: groups whose single recovery is positive, best
    first by `order` (per-gflop: the ranking; recovered: the largest recovery first)."""
    if order not in ORDERS:
        raise UserError(f"unknown --order '{order}'; choose {'|'.join(ORDERS)}")
    helpful = [r for r in ranked if r.recovered > 0]
    if order == "recovered":
        helpful = sorted(helpful, key=lambda r: (-r.recovered, r.rank))
    return [r.name for r in helpful]


@dataclass(frozen=True)
class Step:
    """One greedy step: `added` tried on top of the set kept so far; `groups` the set
    measured; kept: whether it raised the AP (else it is dropped again)."""

    added: str
    groups: tuple[str, ...]
    AP: float
    kept: bool


@dataclass
class Outcome:
    """chosen: the set kept in fp32, in the order added; AP: its AP (the all-quantized AP
    when empty); met: whether AP fp32 − AP is within the limit."""

    chosen: tuple[str, ...]
    AP: float
    met: bool
    steps: list[Step] = field(default_factory=list)


def greedy_search(candidates: Sequence[str], measure: Callable[[tuple[str, ...]], float],
                  ap_reference: float, ap_quantized: float, limit: float) -> Outcome:
    """Add `candidates` one at a time in their order, measuring each combined set; a group
    that does not raise the AP of the set is dropped again; stop as soon as the loss
    against `ap_reference` is at most `limit` (nothing is measured when the all-quantized
    model already is)."""
    chosen: tuple[str, ...] = ()
    current = ap_quantized
    steps: list[Step] = []
    if ap_reference - current <= limit:
        return Outcome(chosen, current, True, steps)
    for name in candidates:
        trial = (*chosen, name)
        ap = measure(trial)
        kept = ap > current
        steps.append(Step(name, trial, ap, kept))
        if kept:
            chosen, current = trial, ap
        if ap_reference - current <= limit:
            return Outcome(chosen, current, True, steps)
    return Outcome(chosen, current, False, steps)
