"""The gradient test on the demo replicates with 1, 2, ... vanilla references.

Every model a replicate trains is a deterministic function of its seed, so the replicates' vanilla models
(marking networks, references, controls) are vanilla models trained with seeds 0, 1, 2, ...; any of them is
independent of another replicate's key and can be its reference. For each replicate folder (written by
`radioactive demo` or benchmarks/studies/from_scratch/demo_replicates.py), both suspects are tested with the first 1, 2, ...
references of: the replicate's own reference, then --references in order, leaving out duplicates (by
sha256), the replicate's marking network (a weak reference: docs/from-scratch.md, "The demo") and any model
trained with the suspect's own seed (the vanilla control is the marked suspect's same-seed twin, a reference
no owner has). One JSON line per test is appended to --results.

    python benchmarks/studies/from_scratch/demo_references.py --demos demo-output runs/demo_replicates/from-scratch-seed1 \
        --references demo-output/private/reference.safetensors ... --counts 1 2 3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from radioactive.data import sha256_file
from radioactive.gradient import gradient_detect
from radioactive.keys import Key
from radioactive.networks import sidecar_path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/, for _common
from _common import RESULTS, append_result, command_line  # noqa: E402


def training_seed(weights: Path) -> int:
    """The training seed recorded in a model's sidecar (written by `radioactive train`)."""
    return json.loads(sidecar_path(weights).read_text())["recipe"]["seed"]


def usable_references(demo: Path, weights: Path, extra: list[Path]) -> list[Path]:
    """The references a suspect of this replicate may be tested with, in order (module docstring): the
    replicate's own reference(s), then ``extra``; never the marking network, the suspect itself, a duplicate or
    a model trained with the suspect's own seed."""
    usable, seen = [], {sha256_file(demo / "private" / "marking-network.safetensors"), sha256_file(weights)}
    for r in [*sorted((demo / "private").glob("reference*.safetensors")), *extra]:
        digest = sha256_file(r)
        if digest not in seen and training_seed(r) != training_seed(weights):
            usable.append(r)
        seen.add(digest)
    return usable


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demos", type=Path, nargs="+", required=True, help="demo output folders")
    p.add_argument("--references", type=Path, nargs="+", required=True,
                   help="vanilla models, in the order they are added (a replicate's own reference first is usual)")
    p.add_argument("--counts", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--results", type=Path, default=RESULTS / "demo_references.jsonl")
    a = p.parse_args(argv)
    command = command_line(__file__, argv or sys.argv[1:])
    for demo in a.demos:
        key = Key.load(demo / "private" / "key.safetensors")
        seed = json.loads((demo / "summary.json").read_text())["config"]["seed"]
        for suspect in ("marked", "vanilla"):
            weights = demo / "models" / f"{suspect}.safetensors"
            usable = usable_references(demo, weights, a.references)
            for n in a.counts:
                if n > len(usable):
                    continue
                r = gradient_detect(demo / "private" / "record.jsonl", key, weights, usable[:n])
                row = {"demo": str(demo), "demo_seed": seed, "suspect": suspect, "references": [str(x) for x in usable[:n]],
                       "log10_pvalue": r.log10_pvalue, "cosines": [round(c, 4) for c in r.cosines]}
                row = append_result(a.results, row, command)
                print(json.dumps({k: row[k] for k in ("demo_seed", "suspect", "log10_pvalue")} | {"n": n}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
