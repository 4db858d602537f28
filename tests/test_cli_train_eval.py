"""``wsltool train`` / ``wsltool eval`` end to end on a tiny image set (exit codes, outputs, bad CSVs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsltool.cli import main


def _images(root: Path, n: int = 6) -> Path:
    rng = np.random.default_rng(0)
    rows = ["path,label,split"]
    for i in range(n):
        img = rng.integers(0, 255, (48, 56, 3), np.uint8)
        Image.fromarray(img).save(root / f"im{i}.png")
        m = np.zeros((48, 56), np.uint8)
        m[10:30, 12:40] = 255
        Image.fromarray(m).save(root / f"im{i}_anno.png")
        rows.append(f"im{i}.png,{['benign', 'malignant'][i % 2]},{'train' if i < 4 else 'valid'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


def test_train_then_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = _images(tmp_path)
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--labels",
            str(csv),
            "--out",
            str(out),
            "--backbone",
            "tiny",
            "--pretrained",
            "none",
            "--epochs",
            "2",
            "--crop",
            "32",
            "--batch-size",
            "2",
            "--set",
            "output_stride=8",
            "--set",
            "num_threads=1",
            "--no-progress",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "best:" in text and "4 images (2 validation)" in text
    assert (out / "best.pt").exists() and (out / "last.pt").exists()
    assert len((out / "history.jsonl").read_text().splitlines()) == 2
    # resume after the end: nothing left to do, still exit 0
    assert (
        main(
            [
                "train",
                "--labels",
                str(csv),
                "--out",
                str(out),
                "--backbone",
                "tiny",
                "--pretrained",
                "none",
                "--epochs",
                "2",
                "--crop",
                "32",
                "--batch-size",
                "2",
                "--set",
                "output_stride=8",
                "--set",
                "num_threads=1",
                "--no-progress",
                "--resume",
            ]
        )
        == 0
    )
    capsys.readouterr()
    ev = tmp_path / "ev"
    rc = main(
        [
            "eval",
            "--labels",
            str(csv),
            "--model",
            str(out / "best.pt"),
            "--split",
            "valid",
            "--out",
            str(ev),
            "--overlays",
            "1",
            "--json",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == 2 and summary["n_masks"] == 2
    assert 0 <= summary["f1_pos"] <= 100 and 0 <= summary["pixel_auc"] <= 100
    assert (ev / "metrics.csv").exists() and (ev / "summary.csv").exists()
    assert len(list((ev / "overlays").glob("*.png"))) == 1


def test_bad_csv_exit_code_and_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _images(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\nim0.png,benign\nnope.png,malignant\nim0.png,benign\n")
    rc = main(["train", "--labels", str(bad), "--out", str(tmp_path / "o"), "--backbone", "tiny"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "bad.csv" in err and "file not found: nope.png" in err and "duplicate" in err
    assert "Traceback" not in err
    assert not (tmp_path / "o" / "last.pt").exists()


def test_eval_refuses_unsafe_or_wrong_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = _images(tmp_path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x80\x04junk")
    assert main(["eval", "--labels", str(csv), "--model", str(junk)]) == 2
    assert "junk.pt" in capsys.readouterr().err
    assert main(["train", "--labels", str(csv), "--out", str(tmp_path / "x"), "--backbone", "unknown"]) == 2
    assert "unknown backbone" in capsys.readouterr().err


def test_train_seeds_writes_an_ensemble_that_eval_reads_with_tta(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from wsltool.models import Ensemble
    from wsltool.train.checkpoint import load_checkpoint

    csv = _images(tmp_path)
    out = tmp_path / "ens"
    common = ["--backbone", "tiny", "--pretrained", "none", "--epochs", "1", "--crop", "32", "--batch-size", "2"]
    common += ["--set", "output_stride=8", "--set", "num_threads=1", "--no-progress"]
    assert main(["train", "--labels", str(csv), "--out", str(out), "--seeds", "3,7", *common]) == 0
    text = capsys.readouterr().out
    assert "(seed 3)" in text and "(seed 7)" in text and f"ensemble: {out / 'ensemble.pt'}" in text
    model, meta = load_checkpoint(out / "ensemble.pt")
    assert isinstance(model, Ensemble) and len(model.members) == 2
    assert [e["source"] for e in meta["ensemble"]] == [str(out / "seed_3" / "best.pt"), str(out / "seed_7" / "best.pt")]
    assert [e["train_config"]["seed"] for e in meta["ensemble"]] == [3, 7]
    assert meta["ensemble"][0]["fingerprint"] != meta["ensemble"][1]["fingerprint"]
    rows = []
    for tta in ("none", "d4"):
        assert main(["eval", "--labels", str(csv), "--model", str(out / "ensemble.pt"), "--json", "--tta", tta]) == 0
        rows.append(json.loads(capsys.readouterr().out))
    assert rows[0]["n"] == rows[1]["n"] == 6
    assert rows[0]["pixel_auc"] != rows[1]["pixel_auc"]  # the views really were averaged
    for bad, words in (
        (["--seeds", "1"], "--seeds expects two or more distinct integers"),
        (["--seeds", "1,2", "--seed", "3"], "--seed and --seeds exclude each other"),
    ):
        rc = main(["train", "--labels", str(csv), "--out", str(tmp_path / "x"), *bad, *common])
        err = capsys.readouterr().err
        assert rc != 0 and words in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
