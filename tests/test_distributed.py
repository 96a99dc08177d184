"""`torchrun -m radioactive mark`: two CPU processes (gloo) write the same bytes as one; a killed distributed run resumes.

Real CIFAR-10 images (the ``cifar_small`` train split, 120 images), 2 marking steps, batches of 4 (19 units, dealt
out round-robin to the ranks). Every run writes to the same paths (the record names its output folder), so the
released copy, the private holdout folder and the record are compared byte for byte. The subprocesses are not
given OMP_NUM_THREADS: the single process starts with torch's default thread count and torchrun gives its workers
one thread each, and ``MarkingConfig.threads`` must make their arithmetic the same.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from radioactive.errors import RadioactiveError
from radioactive.marking import MarkingConfig
from radioactive.marking.distributed import SINGLE, Ranks, from_env
from radioactive.marking.optimise import cpu_threads
from radioactive.marking.resume import journal_path, part_paths

ARGS = ["--fraction", "0.5", "--seed", "3", "--holdout-fraction", "0.1", "--steps", "2", "--batch-size", "4"]
UNITS = 19  # 15 batches of marked images, 3 of holdout images, 1 chunk of copies
ENV = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RANK", "WORLD_SIZE",
                                                         "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


# ----------------------------------------------------------------------------- pieces


def test_from_env_joins_only_under_torchrun(monkeypatch):
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(v, raising=False)
    assert from_env("cpu") is SINGLE
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert from_env("cpu") is SINGLE  # one process under torchrun: no process group
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RadioactiveError, match="RANK=2 is not in 0..WORLD_SIZE-1"):
        from_env("cpu")
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(RadioactiveError, match="RANK='one' is not an integer"):
        from_env("cpu")


def test_units_are_dealt_round_robin_and_gpus_by_local_rank():
    ranks = [Ranks(r, 3, r % 2) for r in range(3)]
    assert [[n for n in range(8) if r.owns(n)] for r in ranks] == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert ranks[2].device("cuda") == "cuda:0" and ranks[1].device("cuda") == "cuda:1"
    assert ranks[1].device("cpu") == "cpu" and SINGLE.device("cuda") == "cuda"


def test_marking_threads_are_fixed_and_restored():
    with pytest.raises(RadioactiveError, match="threads must be >= 1"):
        MarkingConfig(threads=0)
    before = torch.get_num_threads()
    with cpu_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before


# ----------------------------------------------------------------------------- torchrun, 2 CPU processes


TIMED = ("vault/audit-plan.json", "vault/manifest.json", "vault/commitment.json")  # they say when they were made


def tree(base: Path) -> dict[str, bytes]:
    """Every file under ``base`` but the keys, the metrics files and the vault's files that hold a time (the audit
    plan, hence the manifest, and the commitment), as {relative path: bytes}."""
    return {p.relative_to(base).as_posix(): p.read_bytes() for p in sorted(base.rglob("*"))
            if p.is_file() and not p.name.startswith(("key", "metrics")) and p.relative_to(base).as_posix() not in TIMED}


def clear(base: Path) -> None:
    for p in base.iterdir():
        if not p.name.startswith("key"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def command(nproc: int, src: Path, key_file: Path, out: Path, *extra) -> list[str]:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else [sys.executable]
    return [*launch, "-m", "radioactive", "mark", "--source", str(src), "--key", str(key_file), "--output", str(out),
            "--vault", str(out.parent / "vault"), *ARGS, *map(str, extra)]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def base(tmp_path_factory, key):
    """One folder for every run of this module: (output folder, key file)."""
    tmp = tmp_path_factory.mktemp("distributed")
    return tmp / "out", key.save(tmp / "key.safetensors")


@pytest.fixture(scope="module")
def reference(cifar_small, base):
    """The files of a one-process CLI run, and that run's stderr."""
    out, key_file = base
    proc = run(command(0, cifar_small[0], key_file, out))
    ref = tree(out.parent)
    assert len([f for f in ref if f.startswith("out/")]) == 120 and "vault/record.jsonl" in ref
    return ref, proc.stderr


@pytest.fixture()
def work(base, reference):
    """The output folder and key file, emptied after the reference run."""
    clear(base[0].parent)
    return base


@pytest.mark.slow
def test_two_processes_write_the_same_bytes_as_one(cifar_small, work, reference):
    out, key_file = work
    ref, stderr = reference
    assert "marking:" not in stderr  # no progress bar when stderr is not a terminal
    metrics = out.parent / "metrics.jsonl"
    proc = run(command(2, cifar_small[0], key_file, out, "--metrics", metrics))
    got = tree(out.parent)
    assert sorted(got) == sorted(ref)
    assert [f for f in ref if got[f] != ref[f]] == []
    assert not journal_path(out.parent / "vault" / "record.jsonl").exists()
    assert not part_paths(out.parent / "vault" / "record.jsonl")
    summaries = [ln for ln in proc.stdout.splitlines() if ln.startswith('  "num_marked"')]
    assert summaries == ['  "num_marked": 60,'], "rank 0 alone prints the summary"
    # each rank logged its own units, every unit once
    lines = {r: [json.loads(ln) for ln in p.read_text().splitlines()]
             for r, p in ((0, metrics), (1, out.parent / "metrics.rank1.jsonl"))}
    for r, ls in lines.items():
        assert [x["unit"] for x in ls] == list(range(r, UNITS, 2))
        assert {(x["rank"], x["world_size"]) for x in ls} == {(r, 2)}
        assert ls[-1]["images_done"] == ls[-1]["images_total"]
    assert sum(x["images"] for ls in lines.values() for x in ls) == 130  # 60 marked + 10 holdout + 60 copied


def descendants(pid: int) -> list[int]:
    """The processes under ``pid`` (torchrun starts its workers in sessions of their own)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            out += [int(child), *descendants(int(child))]
    return out


def kill_midway(cmd: list[str], record: Path) -> None:
    """Start torchrun, and SIGKILL it and every worker, as a lost node would, once the ranks journaled 3 units."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            try:
                done = sum(p.read_text().count("\n") - 1 for p in part_paths(record))
            except FileNotFoundError:
                done = 0
            if done >= 3:
                for pid in [proc.pid, *descendants(proc.pid)]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                break
            time.sleep(0.002)
    finally:
        rc = proc.wait(timeout=60)
    assert rc == -signal.SIGKILL, "the run finished before it could be killed"
    time.sleep(0.5)  # the workers' exit
    assert not record.exists() and journal_path(record).exists() and part_paths(record)


@pytest.mark.slow
@pytest.mark.parametrize("resume_nproc", [2, 0], ids=["torchrun", "one-process"])
def test_killed_distributed_run_resumes_to_the_same_bytes(cifar_small, work, reference, resume_nproc):
    out, key_file = work
    ref, _ = reference
    record = out.parent / "vault" / "record.jsonl"
    kill_midway(command(2, cifar_small[0], key_file, out), record)
    metrics = out.parent / "metrics.jsonl"
    run(command(resume_nproc, cifar_small[0], key_file, out, "--resume", "--metrics", metrics))
    redone = [json.loads(ln)["unit"] for p in out.parent.glob("metrics*.jsonl") for ln in p.read_text().splitlines()]
    assert 0 < len(redone) <= UNITS - 3, "the units journaled before the kill are kept, not redone"
    got = tree(out.parent)
    assert sorted(got) == sorted(ref)
    assert [f for f in ref if got[f] != ref[f]] == []
    assert not journal_path(record).exists() and not part_paths(record)
