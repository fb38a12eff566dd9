"""The parts of `coco.md` about where things ran: the device every row's latency was timed on
(never an average over GPUs), and for a run under torchrun each rank's share of the accuracy
pass and, with --latency-per-rank, each rank's latency side by side."""
from __future__ import annotations

from typing import Optional

from harness.report.markdown import fmt, table
from harness.results import CocoResult, CocoRow


def _label(row: CocoRow) -> str:
    return f"{row.backend} {row.device} {row.precision} b{row.batch}"


def latency_device_text(doc: CocoResult) -> Optional[str]:
    """"Latency timed on …" for the rows that ran, grouped by device; None when no row says."""
    groups: dict[str, list[str]] = {}
    for r in doc.rows:
        if r.ok and r.latency_device:
            groups.setdefault(r.latency_device, []).append(_label(r))
    if not groups:
        return None
    ranks = (doc.distributed or {}).get("world_size")
    note = (f" The accuracy pass ran on {ranks} ranks; latency is timed on one device, not "
            "averaged over them." if ranks else "")
    if len(groups) == 1:
        return f"Latency timed on **{next(iter(groups))}** (every row).{note}"
    parts = "; ".join(f"**{device}**: {', '.join(rows)}" for device, rows in groups.items())
    return f"Latency timed on {parts}.{note}"


def ranks_sections(doc: CocoResult) -> list[str]:
    """Markdown lines: the accuracy pass per rank and, where timed, latency per rank."""
    dist = doc.distributed
    if not dist:
        return []
    members = {m["rank"]: m for m in dist.get("ranks") or []}
    hosts = sorted({m["host"] for m in members.values()})
    lines = ["## Ranks", "",
             f"{dist['world_size']} ranks ({dist['launcher']}, {dist['backend']}) on "
             f"{len(hosts)} host{'s' if len(hosts) > 1 else ''} ({', '.join(hosts)}): each ran "
             "its shard of every configuration's batches (batch k on rank k mod world size), "
             "rank 0 merged and scored them. Per rank: images computed + found stored, and "
             "its pass in seconds (the slowest rank is the pass's wall time).", ""]
    rows = []
    for key, passes in (dist.get("passes") or {}).items():
        walls = [p["wall_s"] for p in passes if p.get("wall_s") is not None]
        rows.append([key, ", ".join(f"{p['computed']} + {p['found_stored']}" for p in passes),
                     ", ".join(fmt(p.get("wall_s")) for p in passes),
                     max(walls) if walls else None])
    if rows:
        lines += [table(["configuration", "images per rank (computed + stored)",
                         "pass per rank (s)", "slowest (s)"], rows, align="lllr"), ""]
    timed = [r for r in doc.rows if r.ok and r.latency_per_rank]
    if timed:
        lines += ["### Latency per rank (ms per batch)", "",
                  "Every rank timed every configuration on its own device, one rank after "
                  "the other; spread = (slowest − fastest) / fastest inference median.", ""]
        rows = []
        for r in timed:
            medians = [(x.get("inference_ms") or {}).get("median") for x in r.latency_per_rank]
            known = [m for m in medians if m]
            spread = (max(known) - min(known)) / min(known) if len(known) > 1 else None
            for i, x in enumerate(r.latency_per_rank):
                rows.append([_label(r) if i == 0 else "", x.get("rank"),
                             x.get("device") + (f" ({x['gpu']})" if x.get("gpu") else ""),
                             x.get("host"), (x.get("inference_ms") or {}).get("median"),
                             (x.get("compute_ms") or {}).get("median"),
                             (x.get("total_ms") or {}).get("median"),
                             x.get("images_per_s"), "yes" if x.get("stable") else "no",
                             None if i or spread is None else f"{spread:.1%}"])
        lines += [table(["configuration", "rank", "device", "host", "inference median",
                         "compute median", "pipeline median", "images/s", "stable", "spread"],
                        rows, align="lrllrrrrlr"), ""]
    return lines
