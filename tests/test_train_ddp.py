"""torchrun with 2 CPU processes (gloo): identical weights on both ranks, only rank 0 writes files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from wsltool.testing.cohort import make_cohort


def test_torchrun_two_cpu_ranks(tmp_path: Path) -> None:
    cohort = tmp_path / "cohort"
    make_cohort(cohort, {"train": (1, 1), "valid": (1, 1)}, size=(512, 768), seed=4, lesion_range=(0.2, 0.3))
    out, dump = tmp_path / "model", tmp_path / "dump"
    dump.mkdir()
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "WSLTOOL_DDP_DUMP": str(dump), "OMP_NUM_THREADS": "1"}
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "wsltool",
        "train",
        "--labels",
        str(cohort / "slides.csv"),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--backbone",
        "efficientnet_lite0",
        "--pretrained",
        "none",
        "--set",
        "mpp=2.0",
        "--set",
        "region=64",
        "--set",
        "score_cap=4",
        "--set",
        "top_k=2",
        "--set",
        "n_random=2",
        "--no-progress",
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((dump / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert [x["world"] for x in ranks] == [2, 2]
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"]  # gradients were averaged: same weights
    assert ranks[0]["wrote_files"] and not ranks[1]["wrote_files"]
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "last.pt"]
    hist = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert len(hist) == 1 and "valid_auc" in hist[0]
    # each rank trained on half of the epoch's balanced regions
    assert hist[0]["regions"] == 4
