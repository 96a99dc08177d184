"""Progress of `mark`: JSON-lines metrics (one line per finished unit) and the tqdm bar, shown only on a terminal.

Real CIFAR-10 images (``cifar_small``, 120 train images), 1 marking step, batches of 8.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest

from radioactive.marking import MarkingConfig, mark_folder
from radioactive.marking.progress import metrics_path

CFG = MarkingConfig(steps=1, batch_size=8)


def read_lines(path):
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_metrics_lines_one_per_unit(cifar_small, key, tmp_path):
    metrics = tmp_path / "m" / "metrics.jsonl"
    s = mark_folder(cifar_small[0], key, tmp_path / "out", fraction=0.25, seed=1, config=CFG, progress=False,
                    metrics=metrics)
    lines = read_lines(metrics)
    # 3 marked images of each of 10 classes in batches of 8 (4 units), then one chunk of the 90 copies
    assert [(x["unit"], x["kind"], x["images"]) for x in lines] == [(0, "mark", 8), (1, "mark", 8), (2, "mark", 8),
                                                                     (3, "mark", 6), (4, "copy", 90)]
    assert [x["images_done"] for x in lines] == [8, 16, 24, 30, 120]
    assert {x["images_total"] for x in lines} == {120} and {(x["rank"], x["world_size"]) for x in lines} == {(0, 1)}
    elapsed = [x["elapsed_s"] for x in lines]
    assert elapsed == sorted(elapsed) and all(x["images_per_s"] > 0 for x in lines)
    # the running mean PSNR is the mean over the marked images so far: at the end, the summary's
    record = [json.loads(ln) for ln in (tmp_path / "out.record.jsonl").read_text().splitlines()[1:]]
    first8 = [e["psnr_db"] for e in record[:8]]
    assert lines[0]["psnr_db_mean"] == pytest.approx(sum(first8) / 8, abs=1e-3)
    assert lines[-1]["psnr_db_mean"] == pytest.approx(s.psnr_db_mean, abs=1e-4)
    # a second run appends
    mark_folder(cifar_small[0], key, tmp_path / "out", fraction=0.25, seed=1, config=CFG, progress=False,
                metrics=metrics, overwrite=True)
    assert len(read_lines(metrics)) == 10


def test_metrics_path_of_each_rank(tmp_path):
    p = tmp_path / "metrics.jsonl"
    assert metrics_path(p, 0, 1) == p and metrics_path(p, 0, 4) == p
    assert metrics_path(p, 3, 4) == tmp_path / "metrics.rank3.jsonl"


def test_bar_shows_eta_and_running_psnr(cifar_small, key, tmp_path, capsys):
    mark_folder(cifar_small[0], key, tmp_path / "out", fraction=0.1, seed=1, config=CFG, progress=True)
    err = capsys.readouterr().err
    assert "marking: 100%" in err and "120/120" in err
    assert "<00:00" in err  # elapsed<remaining: the ETA
    assert "psnr=" in err and "dB" in err


def _mark_cli(cifar_small, key, tmp_path, terminal: bool) -> str:
    """stderr of a CLI run marking two listed images, on a pseudo-terminal or a pipe."""
    files = tmp_path / "files.txt"
    files.write_text("airplane/0000.jpg\ncat/0000.jpg\n")
    cmd = [sys.executable, "-m", "radioactive", "mark", "--source", str(cifar_small[0]),
           "--key", str(key.save(tmp_path / "key.safetensors")), "--files", str(files), "--steps", "1",
           "--output", str(tmp_path / "out"), "--vault", str(tmp_path / "vault")]
    if not terminal:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stderr
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # a new pty has 0 columns
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # the terminal closed: the run ended
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=300) == 0
    os.close(leader)
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "pipe"])
def test_cli_bar_only_on_a_terminal(cifar_small, key, tmp_path, terminal):
    err = _mark_cli(cifar_small, key, tmp_path, terminal)
    assert ("marking:" in err and "psnr=" in err) == terminal, err
    assert "2 marked" in err
