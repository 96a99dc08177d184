"""What every benchmark and study script shares: paths, the command line, and ``append_result``.

A script in a sub-folder of ``benchmarks/`` finds this module by putting ``benchmarks/`` on ``sys.path``
first (two lines at the top of each script), then imports what it needs from here:

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/, for _common
    from _common import RESULTS, ROOT, append_result, use_study

Every results line carries the command that produced it (``command``), the commit it ran at
(``git_commit``, with ``+dirty`` when the tree had uncommitted changes), the package version and the torch
version, so a number can be traced back to its code and rerun.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
RESULTS = BENCHMARKS / "results"
STUDIES = BENCHMARKS / "studies"


def use_study(name: str) -> None:
    """Make the scripts of ``benchmarks/studies/<name>/`` importable (``from reproduce import ...``)."""
    path = str(STUDIES / name)
    if path not in sys.path:
        sys.path.insert(0, path)


def command_line(script: str | Path, argv: list[str] | None = None) -> str:
    """``python <script relative to the repository root> <argv, shell-quoted>``: the command to rerun a run.

    Args:
        script: the script's path (``__file__`` or ``sys.argv[0]``).
        argv: its arguments; ``sys.argv[1:]`` when None.
    """
    path = Path(script).resolve()
    try:
        shown = path.relative_to(ROOT).as_posix()
    except ValueError:
        shown = str(script)
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", shlex.quote(shown), *(shlex.quote(str(a)) for a in args)])


def git_commit() -> str | None:
    """``git rev-parse HEAD`` of the repository, plus ``+dirty`` if tracked files differ from it; None without git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def append_result(path: str | Path, row: dict, command: list[str] | str | None = None) -> dict:
    """Append ``row`` as one JSON line to ``path``, stamped with its command and versions; returns the stamped row.

    Args:
        path: the results file (``.jsonl``); its folder is created.
        row: the result's fields; ``command``, ``git_commit``, ``package_version`` and ``torch_version`` are
            set here and replace any already in ``row``.
        command: the command that reproduces the row: a string as given, a list shell-quoted, or None for
            the running script's ``sys.argv`` (``command_line(sys.argv[0])``).

    The line is written with one ``write`` on a file opened for appending, then flushed and synced, so
    concurrent runs appending to the same file do not interleave within a line.
    """
    import torch

    from radioactive import __version__

    if command is None:
        command = command_line(sys.argv[0])
    elif not isinstance(command, str):
        command = shlex.join(str(c) for c in command)
    stamped = {**row, "command": command, "git_commit": git_commit(), "package_version": __version__,
               "torch_version": torch.__version__}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(stamped) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return stamped
