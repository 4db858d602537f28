"""Bad input and bad output places for ``train`` / ``eval`` / ``ensemble``: one line, non-zero, nothing lost.

Each case is one an independent sweep of the CLI found giving a traceback, a silent success or a wrong message.
"""

from __future__ import annotations

import contextlib
import csv as csvmod
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from wsltool.cli import main
from wsltool.errors import LabelsError
from wsltool.testing.images import write_tiny_image_set
from wsltool.train.checkpoint import load_checkpoint, read_checkpoint
from wsltool.train.data import read_image
from wsltool.train.labels import read_labels

TINY_ARGS = ["--backbone", "tiny", "--pretrained", "none", "--crop", "32", "--batch-size", "2"]
TINY_ARGS += ["--set", "output_stride=8", "--set", "num_threads=1", "--no-progress", "--epochs", "1"]


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A labels CSV and two tiny trained runs (min-max, WILDCAT)."""
    root = tmp_path_factory.mktemp("bad")
    csv = write_tiny_image_set(root)
    assert main(["train", "--labels", str(csv), "--out", str(root / "run"), *TINY_ARGS]) == 0
    assert main(["train", "--labels", str(csv), "--out", str(root / "wild"), "--method", "wildcat", *TINY_ARGS]) == 0
    return csv, root / "run" / "best.pt", root / "wild" / "best.pt"


def test_output_places_the_system_refuses_give_one_line(
    trained: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv, run, wild = trained
    capsys.readouterr()
    f = tmp_path / "f.txt"
    f.write_text("keep")
    for out, words in ((f, "exists and is not a folder"), (f / "run", f"cannot create the output folder: {f} is not")):
        assert main(["train", "--labels", str(csv), "--out", str(out), *TINY_ARGS]) != 0
        assert f"{out}: {words}" in _err(capsys)
    # a place the system will not let us write: refused up front ("/proc/1 is not writable") where os.access
    # says so, else by the OS at mkdir (root passes access checks on some kernels); one line naming it either way
    assert main(["train", "--labels", str(csv), "--out", "/proc/1/wsltool-run", *TINY_ARGS]) != 0
    assert "/proc/1/wsltool-run" in _err(capsys)
    assert main(["eval", "--labels", str(csv), "--model", str(run), "--out", str(f), "--no-progress"]) != 0
    assert "exists and is not a folder" in _err(capsys)
    assert main(["ensemble", str(run), str(wild), "-o", "/proc/wsltool-x.pt"]) != 0
    assert "/proc/wsltool-x.pt: cannot write the checkpoint" in _err(capsys)
    folder = tmp_path / "d"
    folder.mkdir()
    assert main(["ensemble", str(run), str(wild), "-o", str(folder), "--overwrite"]) != 0
    assert f"{folder}: is a folder" in _err(capsys)
    assert f.read_text() == "keep" and not list(tmp_path.glob("*.tmp")) and not list(Path("/proc").glob("wsltool*"))
    assert main(["eval", "--labels", str(csv), "--model", str(run.parent)]) != 0
    assert f"{run.parent}: is a folder, not a checkpoint file" in _err(capsys)


def test_a_bad_device_is_named_as_such(trained: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    csv, run, _ = trained
    capsys.readouterr()
    assert main(["train", "--labels", str(csv), "--out", str(run.parent / "x"), *TINY_ARGS, "--device", "bogus"]) != 0
    assert "device 'bogus' is not a device" in _err(capsys)
    assert not (run.parent / "x").exists()
    assert main(["eval", "--labels", str(csv), "--model", str(run), "--device", "bogus"]) != 0
    err = _err(capsys)
    assert "device 'bogus' is not a device" in err and "best.pt" not in err  # the checkpoint is not blamed
    if not torch.cuda.is_available():
        assert main(["eval", "--labels", str(csv), "--model", str(run), "--device", "cuda"]) != 0
        assert "CUDA is not available" in _err(capsys)
    if not torch.backends.mps.is_available():  # every machine but Apple silicon
        assert main(["eval", "--labels", str(csv), "--model", str(run), "--device", "mps"]) != 0
        assert "MPS (Apple silicon) is not available" in _err(capsys)


def test_weights_changed_after_saving_are_refused(
    trained: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """torch reads a zip member without checking it, so flipped weight bytes loaded silently (rc 0, F1+ 0)."""
    csv, run, wild = trained
    blob = torch.load(run, weights_only=True)
    name = next(k for k, v in blob["state_dict"].items() if v.is_floating_point() and v.numel() > 100)
    blob["state_dict"][name].view(-1)[:50] = float("nan")  # as if the bytes were damaged on disk
    bad = tmp_path / "bad.pt"
    torch.save(blob, bad)
    capsys.readouterr()
    assert main(["eval", "--labels", str(csv), "--model", str(bad), "--no-progress"]) != 0
    assert f"{bad}: corrupt (its weights do not match the fingerprint" in _err(capsys)
    assert main(["ensemble", str(wild), str(bad), "-o", str(tmp_path / "e.pt")]) != 0
    assert "do not match the fingerprint" in _err(capsys) and not (tmp_path / "e.pt").exists()
    load_checkpoint(run)  # the intact file still loads


def test_an_ensemble_of_the_same_weights_twice_is_refused(
    trained: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, run, _ = trained
    copy = tmp_path / "copy.pt"
    copy.write_bytes(run.read_bytes())
    capsys.readouterr()
    for other in (run, copy):
        assert main(["ensemble", str(run), str(other), "-o", str(tmp_path / "e.pt")]) != 0
        assert f"{other}: holds the same weights as {run}" in _err(capsys)
    assert not (tmp_path / "e.pt").exists()


def test_unknown_or_misplaced_settings_are_refused_before_anything_is_written(
    trained: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv, _, _ = trained
    out = tmp_path / "r"
    toml = tmp_path / "c.toml"
    toml.write_text("[train]\nepochs = 1\n[bogus]\nx = 1\n")
    capsys.readouterr()
    for extra, words in (
        (["--set", "epoch=5"], "--set epoch: unknown setting"),  # a typo of epochs was silently dropped
        (["--set", "top_k=4"], "top_k: multiple-instance (slide) setting(s), but"),
        (["--config", str(toml)], f"{toml}: unknown section(s) bogus"),
    ):
        assert main(["train", "--labels", str(csv), "--out", str(out), *TINY_ARGS, *extra]) != 0
        assert words in _err(capsys)
        assert not out.exists()


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    """``convert("RGB")`` clipped 16-bit greyscale at 255: 99.7 % of a random image came out white."""
    a = (np.arange(64 * 80).reshape(64, 80) * 13 % 65536).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    img = read_image(tmp_path / "g16.png")
    assert img.shape == (64, 80, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(img[..., 0], np.round(a / 257).astype(np.uint8))
    np.testing.assert_array_equal(img[..., 0], img[..., 2])
    from wsltool.slide import open_slide

    s = open_slide(tmp_path / "g16.png", mpp=1.0)  # the image backend reads it the same way
    np.testing.assert_array_equal(s.read_region(0, 0, 80, 64), img)


def test_labels_differing_only_in_case_and_relative_paths_are_explained(tmp_path: Path) -> None:
    csv = write_tiny_image_set(tmp_path)
    rows = list(csvmod.reader(csv.open()))
    rows[1][1] = "Benign"  # line 2; line 4 has "benign"
    sub = tmp_path / "sub"
    sub.mkdir()
    bad = sub / "bad.csv"
    bad.write_text("\n".join(",".join(r) for r in rows).replace("im5.png", "img/im5.png") + "\n")
    with pytest.raises(LabelsError) as ei:
        read_labels(bad)
    msg = str(ei.value)
    assert "line 4: label 'benign' differs from 'Benign' (line 2) only in case" in msg
    assert f"line 7: file not found: img/im5.png (looked for {sub / 'img' / 'im5.png'}" in msg


def test_eval_out_holds_one_evaluation_replaced_as_a_set(
    trained: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv, run, wild = trained
    ev = tmp_path / "ev"
    assert main(["eval", "--labels", str(csv), "--model", str(run), "--out", str(ev), "--overlays", "4"]) == 0
    assert sorted(p.name for p in (ev / "overlays").iterdir()) == [f"im{i}.png" for i in range(4)]
    first = (ev / "metrics.csv").read_text()
    assert main(["eval", "--labels", str(csv), "--model", str(wild), "--out", str(ev), "--overlays", "1"]) == 0
    assert sorted(p.name for p in (ev / "overlays").iterdir()) == ["im0.png"]  # no overlay of the first model left
    assert (ev / "metrics.csv").read_text() != first
    # a failed evaluation (a label the checkpoint does not know, on the last row) leaves the set as it was
    before = {p.name: p.read_bytes() for p in ev.rglob("*") if p.is_file()}
    odd = tmp_path / "odd.csv"
    odd.write_text(csv.read_text().replace("im5.png,malignant", "im5.png,normal").replace("im", str(csv.parent / "im")))
    capsys.readouterr()
    assert main(["eval", "--labels", str(odd), "--model", str(wild), "--out", str(ev), "--overlays", "3"]) != 0
    assert "normal" in _err(capsys)
    assert {p.name: p.read_bytes() for p in ev.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in ev.iterdir()) == ["metrics.csv", "overlays", "summary.csv"]
    assert main(["eval", "--labels", str(csv), "--model", str(run), "--overlays", "2"]) != 0
    assert "--overlays needs --out" in _err(capsys)
    assert read_checkpoint(run)["meta"]["class_names"] == ["benign", "malignant"]


def _without_split(csv: Path) -> Path:
    """A copy of ``csv`` without its split column (training then makes and writes a split)."""
    rows = [line.split(",")[:2] for line in csv.read_text().splitlines()]
    out = csv.with_name("nosplit.csv")
    out.write_text("\n".join(",".join(r) for r in rows) + "\n")
    return out


@pytest.mark.parametrize("damage", ["truncated", "not_an_image"])
def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_split_behind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    # "truncated" fails in image training (the header reads), "not_an_image" in the slide/image sort
    csv = _without_split(write_tiny_image_set(tmp_path))
    im = tmp_path / "im3.png"
    im.write_bytes(im.read_bytes()[:200] if damage == "truncated" else b"garbage")
    new = tmp_path / "new" / "run"
    assert main(["train", "--labels", str(csv), "--out", str(new), *TINY_ARGS]) != 0
    assert "im3.png" in _err(capsys)
    assert not (tmp_path / "new").exists()  # every folder the run made goes
    seeds = tmp_path / "seeds"
    assert main(["train", "--labels", str(csv), "--out", str(seeds), "--seeds", "0,1", *TINY_ARGS]) != 0
    _err(capsys)
    assert not seeds.exists()  # the split and seed_0/ go too
    old = tmp_path / "old"
    old.mkdir()
    (old / "splits.csv").write_text("an earlier run's split\n")
    (old / "notes.txt").write_text("keep")
    assert main(["train", "--labels", str(csv), "--out", str(old), *TINY_ARGS]) != 0
    _err(capsys)
    assert (old / "splits.csv").read_text() == "an earlier run's split\n"
    assert sorted(p.name for p in old.iterdir()) == ["notes.txt", "splits.csv"]


def _slow_image_run(tmp_path: Path, *extra: str) -> tuple[list[str], Path]:
    """A finished 1-epoch run whose next epochs take seconds (8 training images at crop 224 on a ResNet-18)."""
    rng = np.random.default_rng(0)
    rows = ["path,label"]
    for i in range(11):
        Image.fromarray(rng.integers(0, 255, (240, 240, 3), np.uint8)).save(tmp_path / f"im{i}.png")
        rows.append(f"im{i}.png,{['benign', 'malignant'][i % 2]}")
    (tmp_path / "l.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    # Ctrl-C as at a terminal: a job started in the background (nohup, `&`, some CI runners) inherits SIGINT
    # ignored, and Python then installs no KeyboardInterrupt handler of its own
    main = "import sys; from wsltool.cli import main; sys.exit(main(sys.argv[1:]))"
    code = [sys.executable, "-c", f"import signal; signal.signal(signal.SIGINT, signal.default_int_handler); {main}"]
    args = [*code, "train", "--labels", str(tmp_path / "l.csv"), "--out", str(out), "--backbone", "resnet18"]
    args += ["--pretrained", "none", "--crop", "224", "--batch-size", "2", "--epochs", "1", "--no-progress", *extra]
    subprocess.run(args, check=True, capture_output=True)
    return args, out


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _interrupt_when(args: list[str], ready: Callable[[], bool]) -> None:
    """Run ``args``, send Ctrl-C (SIGINT) as soon as ``ready()``; it must stop with 130 and one line."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().endswith("wsltool train: interrupted"), err


def test_an_overwrite_interrupted_before_its_first_checkpoint_keeps_the_earlier_run(tmp_path: Path) -> None:
    """Ctrl-C in the first epoch of ``train --overwrite``: the earlier run is all there, as it was, its
    ``splits.csv`` included (the new run, with another split seed, had written another split)."""
    args, out = _slow_image_run(tmp_path)
    earlier = _files(out)
    assert {"best.pt", "last.pt", "history.jsonl", "splits.csv"} <= set(earlier)
    seen: dict[str, bytes] = {}

    def set_aside() -> bool:  # the new run is about to begin its first epoch
        if any(out.rglob(".wsltool-replaced-*")):
            seen.update(_files(out))
            return True
        return False

    _interrupt_when([*args, "--overwrite", "--set", "seed=1"], set_aside)
    assert seen["splits.csv"] != earlier["splits.csv"]
    assert _files(out) == earlier  # all of it, and nothing else (no hidden folder left)


def test_seeds_overwritten_then_interrupted_are_the_new_run_only(tmp_path: Path) -> None:
    """``--seeds --overwrite``, Ctrl-C once seed 0 has a checkpoint: no earlier seed or ensemble is kept to be
    mixed with the new run (``--resume`` would have built an ensemble of both)."""
    args, out = _slow_image_run(tmp_path, "--seeds", "0,1")
    earlier = _files(out)
    assert {"seed_0/last.pt", "seed_1/last.pt", "ensemble.pt", "splits.csv"} <= set(earlier)
    old_inode = (out / "seed_0" / "last.pt").stat().st_ino  # set aside by a rename: the inode goes with it

    def seed_0_done() -> bool:  # the new seed 0's first checkpoint is there
        with contextlib.suppress(FileNotFoundError):
            return (out / "seed_0" / "last.pt").stat().st_ino != old_inode
        return False

    _interrupt_when([*args, "--overwrite", "--set", "seed=1"], seed_0_done)
    now = _files(out)
    assert now["seed_0/last.pt"] != earlier["seed_0/last.pt"] and now["splits.csv"] != earlier["splits.csv"]
    assert not [n for n in now if n.startswith("seed_1/") and n.endswith(".pt")] and "ensemble.pt" not in now
    assert not any(out.rglob(".wsltool-replaced-*"))


def test_run_dir_puts_the_earlier_run_back_only_while_the_new_one_has_no_checkpoint(tmp_path: Path) -> None:
    from wsltool.train.rundir import run_dir

    out = tmp_path / "run"
    out.mkdir()
    for n in ("best.pt", "last.pt", "history.jsonl"):
        (out / n).write_text(f"earlier {n}")
    (out / "notes.txt").write_text("not a run file")
    with run_dir(out, overwrite=True):  # stopped early (no error) before a checkpoint: put back too
        assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["notes.txt"]
    assert {p.name: p.read_text() for p in out.iterdir()} == {
        "best.pt": "earlier best.pt",
        "last.pt": "earlier last.pt",
        "history.jsonl": "earlier history.jsonl",
        "notes.txt": "not a run file",
    }
    with pytest.raises(KeyboardInterrupt), run_dir(out, overwrite=True):
        (out / "last.pt").write_text("new last.pt")  # the new run's first checkpoint, then Ctrl-C
        raise KeyboardInterrupt
    assert {p.name: p.read_text() for p in out.iterdir()} == {"last.pt": "new last.pt", "notes.txt": "not a run file"}
    with run_dir(out, resume=True):  # resuming moves nothing
        assert (out / "last.pt").read_text() == "new last.pt"


def test_several_seeds_are_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    """``--seeds`` with ``--overwrite``: seed folders and their ensemble are set aside and come back together."""
    from wsltool.train.rundir import set_aside

    def earlier() -> dict[str, str]:
        for seed in ("seed_0", "seed_1"):
            (tmp_path / seed).mkdir(exist_ok=True)
            for n in ("best.pt", "last.pt", "history.jsonl"):
                (tmp_path / seed / n).write_text(f"earlier {seed}/{n}")
        (tmp_path / "ensemble.pt").write_text("earlier ensemble")
        return files()

    def files() -> dict[str, str]:  # what a user sees (the hidden folders left out)
        seen = [p for p in sorted(tmp_path.rglob("*")) if p.is_file() and ".wsltool-replaced-" not in str(p)]
        return {str(p.relative_to(tmp_path)): p.read_text() for p in seen}

    folders, ens = [tmp_path / "seed_0", tmp_path / "seed_1"], [tmp_path / "ensemble.pt"]
    before = earlier()
    with pytest.raises(KeyboardInterrupt), set_aside(folders, ens):  # Ctrl-C in seed_0's first epoch
        assert files() == {} and len(list(tmp_path.rglob(".wsltool-replaced-*"))) == 3  # each seed's, the ensemble's
        (tmp_path / "seed_0" / "history.jsonl").write_text("new seed_0 epoch 0")
        raise KeyboardInterrupt
    assert files() == before and not list(tmp_path.rglob(".wsltool-replaced-*"))
    with pytest.raises(KeyboardInterrupt), set_aside(folders, ens):  # Ctrl-C in seed_1, seed_0 finished
        (tmp_path / "seed_0" / "last.pt").write_text("new seed_0")
        raise KeyboardInterrupt
    # the new run has begun: none of the earlier seeds is kept to be mixed with it (--resume would)
    assert files() == {"seed_0/last.pt": "new seed_0"} and not list(tmp_path.rglob(".wsltool-replaced-*"))


@pytest.mark.parametrize("after", [1, 4])  # Ctrl-C after seed_0's last.pt / after all of seed_0's files
def test_a_run_interrupted_while_being_set_aside_gets_every_moved_file_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after: int
) -> None:
    """Ctrl-C between two renames of the move-aside: what was moved comes back, and what was not is not taken
    for the new run's checkpoint (and deleted with the rest).  The interrupt is injected at the rename: a real
    Ctrl-C cannot be aimed between two renames."""
    import wsltool.train.rundir as rundir

    folders = [tmp_path / "seed_0", tmp_path / "seed_1"]
    for f in folders:
        f.mkdir()
        for n in ("last.pt", "best.pt", "history.jsonl"):
            (f / n).write_text(f"earlier {f.name}/{n}")
    before = {str(p.relative_to(tmp_path)): p.read_text() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    real, calls = os.replace, []

    def replace(src: Any, dst: Any) -> None:
        calls.append(src)
        if len(calls) == after + 1:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(rundir.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt), rundir.set_aside(folders):
        pytest.fail("the block must not run: the new run never began")
    monkeypatch.setattr(rundir.os, "replace", real)
    assert {str(p.relative_to(tmp_path)): p.read_text() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before
    assert not list(tmp_path.rglob(".wsltool-replaced-*"))


def test_a_split_stays_with_the_checkpoint_it_describes(tmp_path: Path) -> None:
    from wsltool.train.rundir import provisional_file

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt), provisional_file(out / "splits.csv", until=[out / "last.pt"]) as f:
        out.mkdir()
        f.write_text("split")
        raise KeyboardInterrupt  # Ctrl-C before the first epoch ends: nothing of the run is left
    assert not out.exists()
    with pytest.raises(RuntimeError), provisional_file(out / "splits.csv", until=[out / "last.pt"]) as f:
        out.mkdir()
        f.write_text("split")
        (out / "last.pt").write_bytes(b"epoch 1")
        raise RuntimeError  # a crash after epoch 1: the split stays with last.pt, for --resume
    assert (out / "splits.csv").read_text() == "split"
    with pytest.raises(RuntimeError), provisional_file(out / "splits.csv", until=[out / "last.pt"]) as f:
        f.write_text("resumed, new split")
        raise RuntimeError  # a resume that fails before writing a checkpoint puts the run's split back
    assert (out / "splits.csv").read_text() == "split"
    assert sorted(p.name for p in out.iterdir()) == ["last.pt", "splits.csv"]
    # a record kept behind a link: the link stays, what it points at gets the earlier bytes back
    target = tmp_path / "kept.csv"
    target.write_text("earlier")
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "splits.csv").symlink_to(target)
    with pytest.raises(RuntimeError), provisional_file(tmp_path / "linked" / "splits.csv", until=[]) as f:
        f.write_text("failed run")
        raise RuntimeError
    assert (tmp_path / "linked" / "splits.csv").is_symlink() and target.read_text() == "earlier"


def test_a_retrain_table_that_fails_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsltool.train.slides import train_from_rows

    out = tmp_path / "wsltool-retrain"
    with pytest.raises(LabelsError, match=r"missing\.svs") as ei:
        train_from_rows([(str(tmp_path / "missing.svs"), "tumor"), (str(tmp_path / "b.svs"), "normal")], out)
    assert not out.exists()
    # the slides.csv it was written to is taken back: the error names the table's rows, not that file's lines
    msg = str(ei.value)
    assert msg.startswith("the Retrain table: 2 problem(s): row 1: file not found: ") and "; row 2: " in msg
    assert "slides.csv" not in msg and "line" not in msg
    (tmp_path / "b.svs").write_bytes(b"not a slide")
    rows = [(str(tmp_path / "b.svs"), "tumor"), (str(tmp_path / "c.svs"), "normal"), (str(tmp_path / "b.svs"), "Tumor")]
    (tmp_path / "c.svs").write_bytes(b"")
    with pytest.raises(LabelsError) as ei:
        train_from_rows(rows, out)
    assert str(ei.value) == (
        "the Retrain table: 2 problem(s): row 3: label 'Tumor' differs from 'tumor' (row 1) only in case; "
        f"row 3: duplicate of row 1: {tmp_path / 'b.svs'}"
    )
    with pytest.raises(LabelsError) as ei:  # found when the slides are opened, after the table was read
        train_from_rows(rows[:2], out)
    msg = str(ei.value)
    assert msg.startswith(f"the Retrain table: 2 problem(s): row 1: {tmp_path / 'b.svs'}: not a slide or image")
    assert f"; row 2: {tmp_path / 'c.svs'}: " in msg
    assert not out.exists()
    # a relative path is the caller's (the current folder), and a path's own "(line N)" is left alone
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scan (line 2).svs").write_bytes(b"not a slide either")
    with pytest.raises(LabelsError) as ei:
        train_from_rows([("b.svs", "tumor"), ("scan (line 2).svs", "normal")], out)
    msg = str(ei.value)
    assert msg.startswith(f"the Retrain table: 2 problem(s): row 1: {tmp_path / 'b.svs'}: not a slide or image")
    assert f"; row 2: {tmp_path / 'scan (line 2).svs'}: not a slide or image" in msg
    with pytest.raises(LabelsError, match=r"^the Retrain table: 1 problem\(s\): no rows$"):
        train_from_rows([], out)
    assert not out.exists()
    # resuming a folder whose earlier table is restored as the run fails: the rows are named, not that file
    out.mkdir()
    (out / "slides.csv").write_text("path,label\nold.svs,tumor\n")
    (out / "last.pt").write_bytes(b"an earlier run's checkpoint")
    with pytest.raises(LabelsError, match=r"^the Retrain table: 1 problem\(s\): row 1: file not found: "):
        train_from_rows([("missing.svs", "tumor"), ("c.svs", "normal")], out, resume=True)
    assert (out / "slides.csv").read_text() == "path,label\nold.svs,tumor\n"


def test_an_image_setting_on_slides_is_refused_not_dropped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from wsltool.testing import write_svs

    rng = np.random.default_rng(0)
    rows = ["path,label"]
    for i, lab in enumerate(["benign", "malignant", "benign", "malignant"]):
        write_svs(tmp_path / f"s{i}.svs", rng.integers(0, 255, (512, 512, 3), np.uint8), factors=(4,))
        rows.append(f"s{i}.svs,{lab}")
    (tmp_path / "slides.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    for crop in (["--crop", "64"], ["--set", "crop=64"]):
        assert main(["train", "--labels", str(tmp_path / "slides.csv"), "--out", str(out), *crop]) != 0
        err = _err(capsys)
        assert "crop: an image-training setting" in err and "slides.csv lists slides" in err and "region=N" in err
        assert not out.exists()


def test_image_training_under_torchrun_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    csv = write_tiny_image_set(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets: each rank would train alone into the same files
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "--labels", str(csv), "--out", str(tmp_path / "run"), *TINY_ARGS]) != 0
    err = _err(capsys)
    assert "labels.csv lists images: image training runs in one process" in err and "--seeds" in err
    assert not (tmp_path / "run").exists()


def test_an_unreadable_checkpoint_is_named_unreadable_not_corrupt(
    trained: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import os

    csv, run, _ = trained
    locked = tmp_path / "locked.pt"
    locked.write_bytes(run.read_bytes())
    locked.chmod(0)
    # as root the mode does not stop a read: then a file the kernel refuses to read (I/O error) stands in
    target = locked if not os.access(locked, os.R_OK) else Path("/proc/self/mem")
    capsys.readouterr()
    assert main(["eval", "--labels", str(csv), "--model", str(target)]) != 0
    err = _err(capsys)
    assert f"{target}: cannot read the checkpoint" in err and "corrupt" not in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["infer", "s.svs", "-o", "o.zarr", "--model", "m.pt", "--tta", "bogus"], "argument --tta: invalid choice"),
        (["infer", "s.svs", "-o", "o.zarr", "--model", "m.pt", "--mpp", "abc"], "argument --mpp: invalid float"),
        (["train", "--labels", "l.csv", "--out", "o", "--resume", "--overwrite"], "not allowed with argument"),
        (["export"], "the following arguments are required: store"),
        (["infer", "s.svs", "-o", "o.zarr", "--model", "m.pt", "--bogus"], "unrecognized arguments: --bogus"),
        (["cohort", "infer", "c.csv", "-o", "o", "--model", "m.pt", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_usage_errors_are_one_line_too(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        main(argv)
    assert ei.value.code == 2
    err = _err(capsys)
    cmd = " ".join(argv[:2]) if argv[0] == "cohort" else argv[0]  # the (sub-)command the error belongs to
    assert err.startswith(f"wsltool {cmd}: error: ") and needle in err and f"(see wsltool {cmd} --help)" in err


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--batch", "0"], "--batch must be >= 1, got 0"),
        (["--chunk", "8"], "--chunk must be in [16, 4096], got 8"),
        (["--top-k", "0"], "--top-k must be >= 1, got 0"),
        (["--region", "8"], "--region must be >= 16, got 8"),
        (["--overlap", "-1"], "--overlap must be >= 0, got -1"),
        (["--out-factor", "0"], "--out-factor must be >= 1, got 0"),
        (["--mpp", "1000"], "--mpp must be in [0.05, 100] um/px, got 1000.0"),
        (["--threshold", "1.5"], "--threshold must be in (0, 1), got 1.5"),
        (["--device", "tpu"], "--device must be auto, cpu or cuda[:N], got 'tpu'"),
        (["--workers", "-1"], "--workers must be >= 0, got -1"),
        (["--readers", "-1"], "--readers must be >= 0, got -1"),
    ],
)
def test_inference_options_out_of_range_are_named_as_typed(
    extra: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not by the config field behind them (``InferConfig.batch_size``); checked before any file is opened."""
    model = str(tmp_path / "m.pt")
    if extra[0] == "--readers":  # cohort's name for its reader processes per slide
        argv = ["cohort", "infer", str(tmp_path / "c.csv"), "-o", str(tmp_path / "o"), "--model", model, *extra]
    else:
        argv = ["infer", str(tmp_path / "s.svs"), "-o", str(tmp_path / "o.zarr"), "--model", model, *extra]
    capsys.readouterr()
    assert main(argv) == 2
    err = _err(capsys)
    assert err.endswith(f": error: {needle}") and "InferConfig" not in err, err
    assert list(tmp_path.iterdir()) == []
