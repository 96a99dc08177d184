"""Progress of a folder run: a tqdm bar for people, JSON lines for machines.

The bar (``mark`` shows it only when stderr is a terminal) gives images done, rate, ETA and the running
mean PSNR of the marked images. The metrics file (``mark --metrics PATH``) gets one JSON object per unit
finished by this process, appended and flushed as one write, so a reader (or a killed run) never sees a
torn line except possibly the very last::

    {"unit": 12, "kind": "mark", "images": 125, "images_done": 1625, "images_total": 50000,
     "elapsed_s": 41.2, "images_per_s": 39.4, "psnr_db_mean": 42.91, "rank": 0, "world_size": 1}

* ``unit``: the unit's number in the run's fixed plan; ``kind``: ``mark``, ``holdout``, ``copy`` or
  ``unreadable``; ``images``: files in the unit.
* ``images_done`` / ``images_total``: images of this process's units finished so far (including units
  kept from an interrupted run) / in all its units; in a one-process run, the whole run.
* ``elapsed_s``: seconds since this process started its units; ``images_per_s``: images of the units
  done in this invocation (kept units excluded) per second of ``elapsed_s``.
* ``psnr_db_mean``: running mean PSNR (dB, 0-255 scale) of the images this process has marked so far
  (kept units included), ``null`` before the first.
* ``rank``, ``world_size``: this process in a distributed run (``0``, ``1`` otherwise). In a distributed
  run each rank writes its own file: rank r's goes to ``PATH`` with ``.rank<r>`` before the suffix
  (``metrics.rank1.jsonl``); rank 0 writes ``PATH`` itself.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import RadioactiveError


def metrics_path(path: Path, rank: int, world_size: int) -> Path:
    """The metrics file of rank ``rank``: ``path`` for rank 0 (or one process), else ``<stem>.rank<r><suffix>``."""
    return path if world_size == 1 or rank == 0 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


class Progress:
    """Bar and metrics lines of one process's units.

    Args:
        total: images in this process's units.
        show: show the bar (on stderr).
        metrics: JSON-lines file to append to, or None.
        rank, world_size: this process (written in every metrics line).
    """

    def __init__(self, total: int, show: bool, metrics: Path | None = None, rank: int = 0, world_size: int = 1):
        self.total, self.rank, self.world_size = total, rank, world_size
        self.done = self.done_now = 0
        self.psnr_sum, self.psnr_n = 0.0, 0
        self.t0 = time.perf_counter()
        self.bar = tqdm(total=total, desc="marking", unit="img", disable=not show)
        self._f = None
        if metrics is not None:
            path = metrics_path(Path(metrics), rank, world_size)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._f = open(path, "a")  # noqa: SIM115 (kept open for the run; closed by close())
            except OSError as e:
                raise RadioactiveError(f"cannot write the metrics file {path}: {e.strerror or e}") from e

    def update(self, n: int, kind: str, images: int, psnr: list, kept: bool) -> None:
        """Count a finished unit (number ``n``, ``images`` files, the PSNRs of its marked images, None for
        identical ones); ``kept``: finished by an interrupted run (no metrics line)."""
        self.done += images
        self.done_now += 0 if kept else images
        finite = [p for p in psnr if p is not None]
        self.psnr_sum += sum(finite)
        self.psnr_n += len(finite)
        mean = self.psnr_sum / self.psnr_n if self.psnr_n else None
        self.bar.update(images)
        if mean is not None:
            self.bar.set_postfix(psnr=f"{mean:.1f}dB", refresh=False)
        if self._f is not None and not kept:
            elapsed = time.perf_counter() - self.t0
            line = {"unit": n, "kind": kind, "images": images, "images_done": self.done, "images_total": self.total,
                    "elapsed_s": round(elapsed, 3), "images_per_s": round(self.done_now / elapsed, 3) if elapsed > 0 else None,
                    "psnr_db_mean": None if mean is None else round(mean, 4), "rank": self.rank,
                    "world_size": self.world_size}
            self._f.write(json.dumps(line) + "\n")  # one buffered write, flushed whole
            self._f.flush()

    def close(self) -> None:
        self.bar.close()
        if self._f is not None:
            self._f.close()
            self._f = None
