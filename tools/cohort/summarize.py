"""Summarise a cohort output folder: counts, failures with their errors, throughput.

Usage::

    python tools/cohort/summarize.py OUTDIR [--json]

Reads every ``OUTDIR/<slide-id>.result.json`` (the same files ``results.csv`` is built from, so it is right
even while runners are still writing) and ``OUTDIR/events.jsonl`` for the time span of the work.  Slides
listed in ``results.csv`` without a result file count as pending.  Needs only the standard library.
Exit status: 0 when nothing failed, 1 when a slide failed, 2 when OUTDIR holds no cohort output.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any


def load(outdir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Result records (one per slide; pending slides from results.csv) and the event log."""
    results: dict[str, dict[str, Any]] = {}
    for p in sorted(outdir.glob("*.result.json")):
        try:
            r = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        results[str(r.get("slide_id") or p.name.removesuffix(".result.json"))] = r
    table = outdir / "results.csv"
    if table.exists():
        with table.open(newline="") as fh:
            for row in csv.DictReader(fh):
                results.setdefault(row["slide_id"], {"slide_id": row["slide_id"], "status": "pending"})
    events = []
    ev = outdir / "events.jsonl"
    if ev.exists():
        for line in ev.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    return list(results.values()), events


def summarize(outdir: Path) -> dict[str, Any]:
    """Counts, failures, compute seconds and throughput of a cohort output folder."""
    results, events = load(outdir)
    counts = Counter(str(r.get("status", "pending")) for r in results)
    done = [r for r in results if r.get("status") == "done"]
    seconds = sum(float(r.get("seconds") or 0) for r in done)
    times = [float(e["time"]) for e in events if e.get("event") in ("start", "done", "failed")]
    span = max(times) - min(times) if len(times) >= 2 else 0.0
    return {
        "slides": len(results),
        "counts": dict(counts),
        "failures": [
            {"slide_id": r.get("slide_id"), "attempts": r.get("attempts"), "error": r.get("error", "")}
            for r in results
            if r.get("status") == "failed"
        ],
        "slide_seconds": round(seconds, 2),
        "mean_seconds_per_slide": round(seconds / len(done), 2) if done else None,
        "wall_seconds": round(span, 1),
        "slides_per_hour": round(3600 * len(done) / span, 1) if span > 0 else None,
        "workers": len({(e.get("host"), e.get("pid")) for e in events if e.get("event") == "done"}),
        "predicted": dict(Counter(str(r.get("predicted")) for r in done)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", type=Path, help="cohort output folder (wsltool cohort infer -o OUTDIR)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)
    s = summarize(args.outdir)
    if not s["slides"]:
        print(f"{args.outdir}: no cohort results here", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(s, indent=1))
    else:
        c = s["counts"]
        print(f"{args.outdir}: {s['slides']} slides: " + ", ".join(f"{n} {k}" for k, n in sorted(c.items())))
        if s["mean_seconds_per_slide"] is not None:
            print(f"compute: {s['slide_seconds']:.0f} slide-seconds, {s['mean_seconds_per_slide']:.1f} s per slide")
        if s["slides_per_hour"] is not None:
            print(
                f"throughput: {s['slides_per_hour']:.1f} slides/h over {s['wall_seconds']:.0f} s of wall time "
                f"({s['workers']} worker process(es))"
            )
        if s["predicted"]:
            print("predicted: " + ", ".join(f"{n} {k}" for k, n in sorted(s["predicted"].items())))
        for f in s["failures"]:
            print(f"FAILED {f['slide_id']} (attempts {f['attempts']}): {f['error']}")
    return 1 if s["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
