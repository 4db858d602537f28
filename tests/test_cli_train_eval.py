"""``wsltool train`` / ``wsltool eval`` end to end on a tiny image set (exit codes, outputs, bad CSVs)."""

from __future__ import annotations

import csv as csvmod
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsltool.cli import main
from wsltool.testing.images import write_tiny_image_set

TINY_ARGS = ["--backbone", "tiny", "--pretrained", "none", "--crop", "32", "--batch-size", "2"]
TINY_ARGS += ["--set", "output_stride=8", "--set", "num_threads=1", "--no-progress"]


def test_train_then_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = write_tiny_image_set(tmp_path)
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
    with (ev / "summary.csv").open() as fh:
        (written,) = list(csvmod.DictReader(fh))
    for key in ("error", "f1_pos", "f1_neg", "area", "chance_pos", "chance_neg", "pxap", "pixel_auc"):
        assert float(written[key]) == pytest.approx(summary[key], abs=6e-5), key  # written with 4 decimals
    with (ev / "metrics.csv").open() as fh:
        per_image = list(csvmod.DictReader(fh))
    assert len(per_image) == 2  # F1 per image (fractions), averaged into the summary (percent), as the paper
    assert summary["f1_pos"] == pytest.approx(100 * sum(float(r["f1_pos"]) for r in per_image) / 2, abs=1e-3)
    assert len(list((ev / "overlays").glob("*.png"))) == 1
    # the table the CLI prints without --json: headers, then the same values at 2 decimals
    assert main(["eval", "--labels", str(csv), "--model", str(out / "best.pt"), "--split", "valid"]) == 0
    head, vals, foot = capsys.readouterr().out.strip().splitlines()[-3:]
    assert [h.strip() for h in head.split("|")][:3] == ["error %", "F1+", "F1-"]
    assert float(vals.split("|")[1]) == pytest.approx(summary["f1_pos"], abs=0.006)
    assert foot == "(n = 2, with masks 2, threshold 0.5)"


def test_bad_csv_exit_code_and_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_tiny_image_set(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\nim0.png,benign\nnope.png,malignant\nim0.png,benign\n")
    rc = main(["train", "--labels", str(bad), "--out", str(tmp_path / "o"), "--backbone", "tiny"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "bad.csv" in err and "file not found: nope.png" in err and "duplicate" in err
    assert "Traceback" not in err
    assert not (tmp_path / "o" / "last.pt").exists()


def test_eval_refuses_unsafe_or_wrong_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = write_tiny_image_set(tmp_path)
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

    csv = write_tiny_image_set(tmp_path)
    out = tmp_path / "ens"
    common = [*TINY_ARGS, "--epochs", "1"]
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
    # another set of seeds into the same folder would silently replace the ensemble of 3 and 7: refused
    before = (out / "ensemble.pt").read_bytes()
    assert main(["train", "--labels", str(csv), "--out", str(out), "--seeds", "4,5", *common]) != 0
    err = capsys.readouterr().err.strip()
    assert f"{out / 'ensemble.pt'}: already exists" in err and len(err.splitlines()) == 1
    assert (out / "ensemble.pt").read_bytes() == before and not (out / "seed_4").exists()
    # --resume after an invocation interrupted between its seeds (seed 3 done, seed 7 not begun, no ensemble):
    # seed 3 is left as it is, seed 7 starts from the beginning, and the ensemble is built
    seed_3 = (out / "seed_3" / "last.pt").read_bytes()
    for n in ("seed_7/last.pt", "seed_7/best.pt", "seed_7/history.jsonl", "ensemble.pt"):
        (out / n).unlink()
    assert main(["train", "--labels", str(csv), "--out", str(out), "--seeds", "3,7", "--resume", *common]) == 0
    capsys.readouterr()
    assert (out / "seed_3" / "last.pt").read_bytes() == seed_3
    assert [json.loads(line)["epoch"] for line in (out / "seed_7" / "history.jsonl").read_text().splitlines()] == [0]
    model, meta = load_checkpoint(out / "ensemble.pt")
    assert [e["train_config"]["seed"] for e in meta["ensemble"]] == [3, 7] and len(model.members) == 2
    # a seed with best.pt but no last.pt can be neither continued nor started over silently: refused up front
    (out / "seed_7" / "last.pt").unlink()
    kept = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["train", "--labels", str(csv), "--out", str(out), "--seeds", "3,7", "--resume", *common]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"wsltool train: error: {out / 'seed_7'}: holds best.pt but no last.pt, so it cannot be resumed; "
        "--overwrite trains the seeds again"
    )
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == kept
    # with no seed begun there is nothing to resume
    assert main(["train", "--labels", str(csv), "--out", str(tmp_path / "new"), "--seeds", "3,7", "--resume", *common])
    assert "seed_3/last.pt: nothing to resume" in capsys.readouterr().err
    for bad, words in (
        (["--seeds", "1"], "--seeds expects two or more distinct integers"),
        (["--seeds", "1,2", "--seed", "3"], "--seed and --seeds exclude each other"),
    ):
        rc = main(["train", "--labels", str(csv), "--out", str(tmp_path / "x"), *bad, *common])
        err = capsys.readouterr().err
        assert rc != 0 and words in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_run_already_in_out_is_refused_unless_resumed_or_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = write_tiny_image_set(tmp_path)
    out = tmp_path / "run"
    assert main(["train", "--labels", str(csv), "--out", str(out), "--epochs", "1", *TINY_ARGS]) == 0
    before = {n: (out / n).read_bytes() for n in ("best.pt", "last.pt", "history.jsonl")}
    capsys.readouterr()
    # a second run into the same folder: refused, and the first run's files are untouched
    assert main(["train", "--labels", str(csv), "--out", str(out), "--epochs", "2", *TINY_ARGS]) == 2
    err = _one_line_error(capsys)
    assert str(out) in err and "already holds a training run (last.pt, best.pt)" in err and "--overwrite" in err
    assert {n: (out / n).read_bytes() for n in before} == before
    # --seeds checks every member's folder before anything is written
    seeds_out = tmp_path / "ens"
    (seeds_out / "seed_2").mkdir(parents=True)
    (seeds_out / "seed_2" / "last.pt").write_bytes(b"earlier run")
    assert main(["train", "--labels", str(csv), "--out", str(seeds_out), "--seeds", "1,2", *TINY_ARGS]) == 2
    assert "seed_2: already holds a training run (last.pt)" in _one_line_error(capsys)
    assert sorted(p.name for p in seeds_out.rglob("*")) == ["last.pt", "seed_2"]
    # --overwrite replaces it: a fresh history of exactly the new run's epochs
    assert main(["train", "--labels", str(csv), "--out", str(out), "--epochs", "2", "--overwrite", *TINY_ARGS]) == 0
    hist = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [0, 1]
    assert (out / "last.pt").read_bytes() != before["last.pt"]
    # --resume and --overwrite exclude each other (argparse: exit 2)
    with pytest.raises(SystemExit) as ei:
        main(["train", "--labels", str(csv), "--out", str(out), "--resume", "--overwrite", *TINY_ARGS])
    assert ei.value.code == 2


def test_unknown_split_and_non_image_rows_are_named_with_the_csv(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = write_tiny_image_set(tmp_path)
    lines = csv.read_text().splitlines()
    val = tmp_path / "val.csv"
    val.write_text("\n".join([*lines[:5], lines[5].replace(",valid", ",val"), lines[6]]) + "\n")
    assert main(["train", "--labels", str(val), "--out", str(tmp_path / "o1"), *TINY_ARGS]) == 2
    err = _one_line_error(capsys)
    assert f"{val}: 1 problem(s): line 6: unknown split 'val' for im4.png (known: train, valid, test)" in err
    (tmp_path / "notes.txt").write_text("not an image\n")
    txt = tmp_path / "txt.csv"
    txt.write_text("\n".join([*lines, "notes.txt,benign,train"]) + "\n")
    assert main(["train", "--labels", str(txt), "--out", str(tmp_path / "o2"), *TINY_ARGS]) == 2
    err = _one_line_error(capsys)
    assert err.startswith(f"wsltool train: error: {txt}: 1 problem(s): line 8: ") and "notes.txt" in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_weights_of_another_architecture_give_one_line_and_no_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch
    import torchvision

    csv = write_tiny_image_set(tmp_path)
    r18 = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), r18)
    args = ["--backbone", "resnet50", "--pretrained", str(r18), "--epochs", "1", "--no-progress"]
    assert main(["train", "--labels", str(csv), "--out", str(tmp_path / "o"), *args]) == 2
    err = _one_line_error(capsys)
    assert f"{r18}: weights do not fit resnet50" in err and "another shape" in err
    assert not (tmp_path / "o").exists()


def _glas_release(tmp_path: Path) -> Path:
    """A tiny copy of the official GlaS release layout: BMP images and masks, Grade.csv, a test image."""
    rel = tmp_path / "Warwick QU Dataset (Released 2016_07_08)"
    rel.mkdir()
    rng = np.random.default_rng(1)
    names = {"train_1": "malignant", "train_3": "benign", "train_4": "malignant", "train_6": "benign"}
    names |= {"train_2": "benign", "train_5": "malignant", "testA_1": "benign"}  # train_2 / _5: the valid split
    for n in names:
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), np.uint8)).save(rel / f"{n}.bmp")
        Image.fromarray((rng.random((40, 48)) > 0.5).astype(np.uint8)).save(rel / f"{n}_anno.bmp")
    rows = "".join(f"{n},{i}, {g} ,{g}\n" for i, (n, g) in enumerate(names.items()))
    (rel / "Grade.csv").write_text("name,Patient ID,grade (GlaS),grade (Sirinukunwattana et al. 2015)\n" + rows)
    return rel


def test_glas_release_layout_trains_into_a_new_folder_and_writes_nothing_beside_the_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rel = _glas_release(tmp_path)
    listing = sorted(p.name for p in rel.iterdir())
    out = tmp_path / "new" / "sub"
    assert main(["train", "--labels", str(rel), "--out", str(out), "--epochs", "1", *TINY_ARGS]) == 0
    assert "trained 4 images (2 validation)" in capsys.readouterr().out
    assert (out / "best.pt").is_file()
    assert main(["eval", "--labels", str(rel), "--model", str(out / "best.pt"), "--split", "valid", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == 2 and summary["n_masks"] == 2
    assert sorted(p.name for p in rel.iterdir()) == listing  # nothing written into the data set


def test_the_glas_example_script_trains_evaluates_tables_and_refuses_a_second_run(tmp_path: Path) -> None:
    """``examples/glas/run_glas.py`` (the script the README's GlaS table comes from), end to end on a tiny
    release-layout copy: result.json with the valid metrics, overlays, ``--table``, one-line refusals."""
    import subprocess
    import sys

    rel = _glas_release(tmp_path)
    script = Path(__file__).resolve().parents[1] / "examples" / "glas" / "run_glas.py"
    tiny = ["--set", "backbone=tiny", "--set", "pretrained=none", "--set", "output_stride=8", "--set", "epochs=1"]
    tiny += ["--set", "crop=32", "--set", "batch_size=2", "--set", "seed=4"]
    base = [sys.executable, str(script), "--data", str(rel), "--out", str(tmp_path / "runs"), "--overlays", "1"]

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *extra], capture_output=True, text=True, timeout=300, check=False)

    done = run("--run", "wildcat", "--name", "W_seed4", *tiny)
    assert done.returncode == 0, done.stderr
    res = json.loads((tmp_path / "runs" / "W_seed4" / "result.json").read_text())
    assert res["run"] == "W_seed4" and res["n"] == 2 and res["n_masks"] == 2  # the two valid images
    assert res["model"]["method"] == "wildcat" and res["train"]["seed"] == 4 and res["train"]["epochs"] == 1
    assert 0 <= res["pxap"] <= 100 and 0 <= res["f1_pos"] <= 100
    assert len(list((tmp_path / "runs" / "W_seed4" / "eval_valid" / "overlays").glob("*.png"))) == 1
    table = subprocess.run(
        [sys.executable, str(script), "--table", str(tmp_path / "runs")], capture_output=True, text=True, check=True
    ).stdout
    assert f"| W_seed4 | best (epoch 1) | {res['error']:.1f} | {res['f1_pos']:.1f} |" in table
    again = run("--run", "wildcat", "--name", "W_seed4", *tiny)
    assert again.returncode == 2 and "already holds a training run" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1 and "Traceback" not in again.stderr
    bad = run("--name", "x", *tiny, "--set", "epoch=3")
    assert bad.returncode == 2 and "--set epoch: unknown setting" in bad.stderr
