"""Resumable, safe `mark`: a killed run resumes to the same bytes; the output folder rules (--resume, --overwrite).

Real CIFAR-10 images (the ``cifar_small`` train split, 120 images), 2 marking steps, batches of 4 so that a
run has many units. A run's files are compared as ``{relative path: bytes}`` of the released copy and the
vault (record, holdout folder, key copy, the manifest's file list), always written at the same paths so that
the record (which names the output folder) can be compared byte for byte. The audit plan and the commitment
are left out: they say when they were made (the plan's history, commitment.json's time).
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

import radioactive.marking.folder as folder_marking
from radioactive.errors import RadioactiveError
from radioactive.marking import MarkingConfig, mark_folder
from radioactive.marking.resume import journal_path

CFG = MarkingConfig(steps=2, batch_size=4)
ARGS = {"fraction": 0.5, "seed": 3, "holdout_fraction": 0.1}
CLI_ARGS = ["--fraction", "0.5", "--seed", "3", "--holdout-fraction", "0.1", "--steps", "2", "--batch-size", "4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # the same arithmetic as this process's


def vault_of(out: Path) -> Path:
    return out.parent / "vault"


def record_of(out: Path) -> Path:
    return vault_of(out) / "record.jsonl"


def tree(out: Path) -> dict[str, bytes]:
    """Every file a run leaves: the released copy, the vault and anything beside them (module docstring)."""
    files = {p.relative_to(out.parent).as_posix(): p.read_bytes() for p in sorted(out.parent.rglob("*"))
             if p.is_file() and not p.relative_to(out.parent).as_posix().startswith("key")}
    for timed in ("vault/audit-plan.json", "vault/commitment.json"):
        files.pop(timed, None)
    if "vault/manifest.json" in files:
        listed = json.loads(files["vault/manifest.json"])["files"]
        files["vault/manifest.json"] = json.dumps({k: v for k, v in listed.items() if k != "audit-plan.json"}).encode()
    return files


def clear(out: Path) -> None:
    for p in out.parent.iterdir():
        if not p.name.startswith("key"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def lib(src, key, out, **kw):
    return mark_folder(src, key, out, **{**ARGS, "config": CFG, "progress": False, "vault": vault_of(out), **kw})


def reference(src, key, out) -> dict[str, bytes]:
    """The files of an uninterrupted run into ``out``, which is then removed."""
    s = lib(src, key, out)
    assert s.num_marked == 60 and s.num_holdout > 0 and s.num_copied == 60
    ref = tree(out)
    clear(out)
    return ref


def interrupt(monkeypatch, src, key, out, after: int, **kw) -> None:
    """A run that dies in its ``after + 1``-th marked batch, as a kill would (no clean-up runs)."""
    real, calls = folder_marking.mark_batch, []

    def dying(*a, **kw):
        calls.append(1)
        if len(calls) > after:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(folder_marking, "mark_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        lib(src, key, out, **kw)
    monkeypatch.setattr(folder_marking, "mark_batch", real)


def journal_units(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in journal_path(record_of(out)).read_text().splitlines()[1:]]


def one_line_error(proc, rc: int) -> str:
    assert proc.returncode == rc, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "radioactive", "mark", *map(str, args)], capture_output=True,
                          text=True, timeout=600, env=ENV, check=False)


@pytest.fixture()
def work(tmp_path, key):
    key_file = key.save(tmp_path / "key.safetensors")
    return tmp_path / "out", key_file


# ----------------------------------------------------------------------------- a real killed run


def test_killed_cli_run_resumes_to_the_same_bytes(cifar_small, key, work):
    out, key_file = work
    src = cifar_small[0]
    ref = reference(src, key, out)
    journal = journal_path(record_of(out))
    cmd = [sys.executable, "-m", "radioactive", "mark", "--source", src, "--key", key_file, "--output", out,
           "--vault", vault_of(out), *CLI_ARGS]
    proc = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if journal.is_file() and journal.read_text().count("\n") >= 3:  # header and two finished batches
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
    finally:
        rc = proc.wait(timeout=60)
    assert rc == -signal.SIGKILL, "the run finished before it could be killed"
    assert not record_of(out).exists()
    done = journal_units(out)
    assert 2 <= len(done) < 19  # 15 marked batches, 3 holdout batches, 1 chunk of copies
    # nothing in the killed copy looks like an image unless it is a complete one
    for p in out.rglob("*"):
        if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".jpeg"):
            assert not p.name.startswith(".") and f"out/{p.relative_to(out).as_posix()}" in ref, p
            assert p.read_bytes() == ref[f"out/{p.relative_to(out).as_posix()}"]
    kept = {f"{b}/{rel}": (out.parent / ("out" if b == "output" else "vault/holdout") / rel).stat().st_mtime_ns
            for u in done for b, rel, _ in u["files"]}

    line = one_line_error(cli("--source", src, "--key", key_file, "--output", out, "--vault", vault_of(out), *CLI_ARGS), 1)
    assert "not empty" in line and "--resume" in line and "--overwrite" in line
    proc2 = cli("--source", src, "--key", key_file, "--output", out, "--vault", vault_of(out), *CLI_ARGS, "--resume")
    assert proc2.returncode == 0, proc2.stderr
    assert json.loads(proc2.stdout)["num_marked"] == 60
    assert tree(out) == ref  # no journal, no temporary file, every byte the same
    for name, mtime in kept.items():  # finished batches were verified and kept, not redone
        b, rel = name.split("/", 1)
        assert (out.parent / ("out" if b == "output" else "vault/holdout") / rel).stat().st_mtime_ns == mtime


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_inputs_same_bytes(cifar_small, key, work):
    out, _ = work
    first = reference(cifar_small[0], key, out)
    lib(cifar_small[0], key, out)
    assert tree(out) == first
    clear(out)
    lib(cifar_small[0], key, out, seed=4)
    other = tree(out)
    assert other["vault/record.jsonl"] != first["vault/record.jsonl"]  # the comparison can fail


# ----------------------------------------------------------------------------- resume in process


def test_resume_redoes_the_unfinished_and_the_damaged(cifar_small, key, work, monkeypatch):
    out, _ = work
    src = cifar_small[0]
    ref = reference(src, key, out)
    interrupt(monkeypatch, src, key, out, after=5)
    done = journal_units(out)
    assert len(done) == 5
    # damage: a finished batch's image altered, another deleted, temporary files left by a kill, a torn journal line
    first = out / done[0]["files"][0][1]
    first.write_bytes(first.read_bytes()[:-7])
    (out / done[1]["files"][0][1]).unlink()
    (out / "airplane" / ".radioactive-x1y2.partial").write_bytes(b"half an image")
    (out / "airplane" / ".tmp-abcd.png").write_bytes(b"half an image")
    with open(journal_path(record_of(out)), "a") as f:
        f.write('{"unit": 5, "files": [["output", "air')
    s = lib(src, key, out, resume=True)
    assert s.num_marked == 60 and s.num_copied == 60
    assert tree(out) == ref


def test_resume_with_other_arguments_is_refused(cifar_small, key, work, monkeypatch):
    out, _ = work
    src = cifar_small[0]
    interrupt(monkeypatch, src, key, out, after=2)
    before = tree(out)
    changes = [({"seed": 4}, "seed"), ({"config": MarkingConfig(steps=3, batch_size=4)}, "config.steps"),
               ({"fraction": 0.4}, "marked_files"), ({"holdout_fraction": 0.0}, "holdout_fraction"),
               ({"files": ["cat/0000.jpg"], "fraction": None}, "fraction")]
    for kw, field in changes:
        with pytest.raises(RadioactiveError, match=f"other arguments.*{field}"):
            lib(src, key, out, resume=True, **kw)
    other_key = type(key)(key.carriers.flip(0), key.classes, key.network)
    with pytest.raises(RadioactiveError, match="key_fingerprint"):
        lib(src, other_key, out, resume=True)
    assert tree(out) == before  # a refusal touches nothing


def test_resume_of_a_finished_run_or_of_a_foreign_folder_is_refused(cifar_small, key, work):
    out, _ = work
    src = cifar_small[0]
    lib(src, key, out, resume=True)  # nothing there yet: a fresh start
    done = tree(out)
    with pytest.raises(RadioactiveError, match="nothing to resume"):
        lib(src, key, out, resume=True)
    (out / "README.txt").write_text("mine\n")
    with pytest.raises(RadioactiveError, match="README.txt"):
        lib(src, key, out, overwrite=True)
    with pytest.raises(RadioactiveError, match="nothing to resume"):  # the vault holds the finished run's record
        lib(src, key, out, resume=True)
    (out / "README.txt").unlink()
    assert tree(out) == done


def test_journal_path_holding_another_file_is_refused(cifar_small, key, work):
    out, _ = work
    vault_of(out).mkdir()
    journal_path(record_of(out)).write_text("my notes\n")
    with pytest.raises(RadioactiveError, match="not a journal"):
        lib(cifar_small[0], key, out)
    assert journal_path(record_of(out)).read_text() == "my notes\n" and not out.exists()


# ----------------------------------------------------------------------------- overwrite


def test_overwrite_restarts_from_scratch(cifar_small, key, work, monkeypatch):
    out, _ = work
    src = cifar_small[0]
    ref = reference(src, key, out)
    lib(src, key, out, seed=4, fraction=0.2)  # a finished run with other arguments
    interrupt(monkeypatch, src, key, out, after=1, overwrite=True)  # and an interrupted restart on top
    (out / "cat" / ".radioactive-zz.partial").write_bytes(b"")
    with pytest.raises(RadioactiveError, match="already holds the record"):  # the finished run's, in the vault
        lib(src, key, out)
    s = lib(src, key, out, overwrite=True)
    assert s.num_marked == 60
    now = tree(out)
    same = [k for k in ref if k != "vault/manifest.json"]
    assert {k: now[k] for k in same} == {k: ref[k] for k in same}
    # nothing outside the output folder is deleted: the old run's private holdout images stay, unlisted in the
    # record; the vault's manifest lists them, as every file of the vault
    stale = set(now) - set(ref)
    assert stale and all(k.startswith("vault/holdout/") for k in stale)
    assert {f"vault/{k}" for k in json.loads(now["vault/manifest.json"])} >= stale


# ----------------------------------------------------------------------------- command line


def test_resume_and_overwrite_together_is_a_usage_error(tmp_path, cifar_small, key):
    key_file = key.save(tmp_path / "key.safetensors")
    proc = cli("--source", cifar_small[0], "--key", key_file, "--output", tmp_path / "out", "--vault",
               tmp_path / "vault", *CLI_ARGS, "--resume", "--overwrite")
    line = one_line_error(proc, 2)
    assert "--overwrite" in line and "--resume" in line
    assert not (tmp_path / "out").exists()
    with pytest.raises(RadioactiveError, match="exclude each other"):
        lib(cifar_small[0], key, tmp_path / "out", resume=True, overwrite=True)


def test_mark_help_documents_resume_and_overwrite():
    from radioactive.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["mark"]
    text = " ".join(sub.format_help().split())
    assert "--resume" in text and "--overwrite" in text
    assert "sha256" in text and "byte-identical" in text and "start afresh" in text
