"""Cohort runs on dask.distributed: atomic per-slide outputs, reruns, failures, killed workers."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from histoscope.cli import main
from histoscope.cohort import DONE, PARTIAL, process_slide, run_cohort, slide_names

pytest.importorskip("distributed")


def _image(path: Path, seed: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = np.full((384, 512, 3), 240, np.uint8)
    y, x = rng.integers(60, 180, 2)
    img[y : y + 150, x : x + 200] = (170, 90, 160)  # a block of "tissue"
    Image.fromarray(img).save(path)
    return path


def test_slide_names_are_unique(tmp_path):
    a, b = tmp_path / "x" / "case.tif", tmp_path / "y" / "case.tif"
    names = slide_names([a, b, tmp_path / "other.ome.zarr", a])
    assert len(names) == 3 and "other" in names
    assert all(n.startswith("case-") for n in names if n != "other")


def test_process_slide_publishes_only_complete_outputs(tmp_path):
    def good(slide: Path, out: Path) -> dict:
        (out / "a.txt").write_text("a")
        (out / "sub").mkdir()
        (out / "sub" / "b.txt").write_text("b")
        return {"n": 2}

    def bad(slide: Path, out: Path) -> None:
        (out / "half.txt").write_text("half")
        raise ValueError("broken slide")

    doc = process_slide("s1.tif", str(tmp_path), "s1", good)
    assert doc["files"] == ["a.txt", "sub/b.txt"] and doc["info"] == {"n": 2}
    assert json.loads((tmp_path / "s1" / DONE).read_text())["files"] == doc["files"]
    with pytest.raises(ValueError, match="broken slide"):
        process_slide("s2.tif", str(tmp_path), "s2", bad)
    assert not (tmp_path / "s2").exists()
    assert list((tmp_path / PARTIAL).iterdir()) == []
    # a finished slide is not redone
    assert process_slide("s1.tif", str(tmp_path), "s1", bad)["files"] == doc["files"]


def test_cli_cohort_reports_a_bad_slide_and_skips_finished_ones(tmp_path, capsys):
    slides = [_image(tmp_path / f"s{i}.png", i) for i in range(2)]
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00 not really a tiff")
    out = tmp_path / "out"
    argv = ["cohort", *map(str, [*slides, broken]), "--out", str(out), "--mpp", "1.0",
            "--workers", "1"]  # fmt: skip
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "broken.tif" in captured.out
    for s in ("s0", "s1"):
        assert (out / s / "tissue_mask.png").is_file() and (out / s / DONE).is_file()
    assert not (out / "broken").exists()
    summary = json.loads((out / "cohort.json").read_text())
    assert summary["counts"] == {"done": 2, "skipped": 0, "failed": 1}
    first = (out / "s0" / DONE).read_text()
    assert main(argv) == 1
    summary = json.loads((out / "cohort.json").read_text())
    assert summary["counts"] == {"done": 0, "skipped": 2, "failed": 1}
    assert (out / "s0" / DONE).read_text() == first
    assert "2 skipped" in capsys.readouterr().out


def test_cli_cohort_refuses_unknown_tasks_before_starting(tmp_path, capsys):
    rc = main(["cohort", str(tmp_path / "a.png"), "--out", str(tmp_path), "--tasks", "nope"])
    assert rc == 2 and "unknown task(s) nope" in capsys.readouterr().err


def test_killed_worker_and_failing_slide_do_not_stop_the_others(tmp_path):
    from distributed import LocalCluster

    marks = tmp_path / "marks"
    marks.mkdir()

    def work(slide: Path, out: Path) -> dict:
        # records each attempt; the victim waits until the test has killed its worker once
        import os as _os
        import time as _time

        attempt = marks / f"{slide.name}.{_os.getpid()}"
        attempt.write_text("")
        if slide.name == "bad.tif":
            raise ValueError("cannot read bad.tif")
        if slide.name == "victim.tif":
            deadline = _time.monotonic() + 60
            while not (marks / "release").exists() and _time.monotonic() < deadline:
                _time.sleep(0.05)
        (out / "result.txt").write_text(slide.name)
        return {}

    def killer() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = sorted(marks.glob("victim.tif.*"))
            if found:
                os.kill(int(found[0].suffix[1:]), signal.SIGKILL)
                (marks / "release").write_text("")
                return
            time.sleep(0.05)

    slides = [tmp_path / n for n in ("a.tif", "victim.tif", "bad.tif", "b.tif")]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:  # fmt: skip
        t = threading.Thread(target=killer, daemon=True)
        t.start()
        outcomes = run_cohort(slides, tmp_path / "out", work, scheduler=cluster.scheduler_address)
        t.join(timeout=5)
    status = {o.name: o.status for o in outcomes}
    assert status == {"a": "done", "victim": "done", "bad": "failed", "b": "done"}
    assert "cannot read bad.tif" in next(o.error for o in outcomes if o.name == "bad")
    attempts = sorted(p.suffix for p in marks.glob("victim.tif.*"))
    assert len(attempts) == 2 and attempts[0] != attempts[1]  # rerun in a fresh process
    for name in ("a", "victim", "b"):
        assert (tmp_path / "out" / name / "result.txt").read_text() == f"{name}.tif"
    assert not (tmp_path / "out" / PARTIAL).exists()
