"""Paired comparison of two GlaS run families over the seeds they share: is A above B, and how clearly?

With 18 ``valid`` images the seed moves PxAP by 5-10 points (docs/glas.md, lesson 3), so two methods are compared
seed by seed (same seed = same crops, same initial heads, and for min-max runs after a warm-up the same
warm-up epochs as the default's run of that seed).  For each metric this prints the means, the paired
difference A - B with its standard error, a 95 % t interval, how many seeds A is higher on, and an exact
two-sided sign-flip permutation p-value (all 2^n flips of the differences' signs; no normality assumed).

What wsltool calls *clearly above* (the GlaS issue's "clearly above WILDCAT on PxAP"): over at least 8
paired seeds, the 95 % interval of the mean difference lies above zero and the sign-flip p-value is below
0.05.  Anything less is "above" or "level", as the README words it.

Usage (run folders as ``examples/glas/run_glas.py`` writes them; the seed is read from each
``result.json``, so a folder of any name pairs by its seed; a seed found twice in a family is refused)::

    .venv/bin/python tools/experiments/glas_paired.py --a '/tmp/glas2/E40BR_seed*' --b '/tmp/glas2/E40W_seed*'
    .venv/bin/python tools/experiments/glas_paired.py --a '/tmp/glas2/W10_seed*' --b '/tmp/glas2/C2_seed*'

Reads only ``result.json`` files: instant, no model is loaded.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import statistics as st
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

METRICS = ("pxap", "pixel_auc", "f1_pos", "f1_neg", "area", "error")


def load_family(patterns: list[str]) -> dict[int, dict]:
    """Results of the run folders matching ``patterns``, keyed by training seed (duplicates refused)."""
    out: dict[int, dict] = {}
    for pat in patterns:
        for d in sorted(glob.glob(pat)):
            p = Path(d) / "result.json"
            if not p.is_file():
                continue
            r = json.loads(p.read_text())
            seed = int(r["train"]["seed"])
            if seed in out:
                raise SystemExit(f"error: seed {seed} twice: {out[seed]['_dir']} and {d}")
            r["_dir"] = d
            out[seed] = r
    return out


def sign_flip_p(diffs: list[float], draws: int = 200_000) -> float:
    """Two-sided p-value of the mean difference under random sign flips.

    Exact (all 2^n flips) up to 20 differences; beyond that ``draws`` random flips from a fixed seed (the
    Monte Carlo error of p is below 0.002 at p = 0.05).
    """
    d = np.asarray(diffs, dtype=float)
    n = d.size
    if n == 0:
        return math.nan
    obs = abs(d.sum()) - 1e-12
    if n <= 20:
        signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1).astype(np.int8)
    else:
        signs = np.random.default_rng(0).choice(np.array([1, -1], dtype=np.int8), size=(draws, n))
    return float((np.abs(signs @ d) >= obs).mean())


def compare(a: dict[int, dict], b: dict[int, dict], metric: str) -> dict[str, float]:
    """Paired statistics of ``metric`` (A - B) over the seeds both families have."""
    seeds = sorted(set(a) & set(b))
    diffs = [float(a[s][metric]) - float(b[s][metric]) for s in seeds]
    n = len(diffs)
    mean = st.mean(diffs) if n else math.nan
    sd = st.stdev(diffs) if n > 1 else math.nan
    se = sd / math.sqrt(n) if n > 1 else math.nan
    from scipy.stats import t as student_t

    half = float(student_t.ppf(0.975, n - 1)) * se if n > 1 else math.nan
    return {
        "n": n,
        "a": st.mean(float(a[s][metric]) for s in seeds) if n else math.nan,
        "b": st.mean(float(b[s][metric]) for s in seeds) if n else math.nan,
        "diff": mean,
        "se": se,
        "lo": mean - half,
        "hi": mean + half,
        "higher": sum(d > 0 for d in diffs),
        "p": sign_flip_p(diffs),
    }


def verdict(r: dict[str, float]) -> str:
    """``"clearly above"`` (at least 8 pairs, 95 % interval above zero, p < 0.05), ``"above"`` or ``"not above"``."""
    if r["n"] >= 8 and r["lo"] > 0 and r["p"] < 0.05:
        return "clearly above"
    return "above" if r["diff"] > 0 else "not above"


def report(a: dict[int, dict], b: dict[int, dict], metrics: Sequence[str]) -> str:
    """Print one row of paired statistics per metric; return the :func:`verdict` on PxAP."""
    print(f"{'metric':10s} {'A':>6s} {'B':>6s} {'A-B':>6s} {'se':>5s} {'95% interval':>16s} {'higher':>7s} {'p':>6s}")
    for m in metrics:
        r = compare(a, b, m)
        print(
            f"{m:10s} {r['a']:6.1f} {r['b']:6.1f} {r['diff']:+6.1f} {r['se']:5.1f} "
            f"[{r['lo']:+6.1f}, {r['hi']:+6.1f}] {r['higher']:3d}/{r['n']:<3d} {r['p']:6.3f}"
        )
    return verdict(compare(a, b, "pxap"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", action="append", required=True, help="glob of family A's run folders (repeatable)")
    ap.add_argument("--b", action="append", required=True, help="glob of family B's run folders (repeatable)")
    ap.add_argument("--metrics", nargs="+", default=list(METRICS), choices=METRICS)
    args = ap.parse_args(argv)
    a, b = load_family(args.a), load_family(args.b)
    seeds = sorted(set(a) & set(b))
    if not seeds:
        print(f"error: no shared seeds (A has {sorted(a)}, B has {sorted(b)})", file=sys.stderr)
        return 2
    print(f"paired seeds: {seeds}")
    print(f"PxAP: A is {report(a, b, args.metrics)} B")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
