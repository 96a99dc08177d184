"""The gradient test's temperature T on the demo replicates, with 1, 2, ... references.

For each replicate folder (written by `radioactive demo` or benchmarks/demo_replicates.py), its marked suspect
and its vanilla control, and the marked suspects that benchmarks/demo_marking.py trained for it (``--variants``:
the tags of those runs, read from ``--work``), are tested with every temperature and number of references.
References follow benchmarks/demo_references.py: the replicate's own, then ``--references`` in order, never
its marking network nor a model trained with the suspect's own seed. One JSON line per test is appended to
``--results``.

    python benchmarks/gradient_temperature.py --demos demo-output runs/demo_replicates/from-scratch-seed{1,2} \
        --references ... --temperatures 1 2 4 --counts 1 3 --variants psnr40.5
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from demo_references import usable_references  # benchmarks/ is on sys.path when a script here runs
from reproduce import append
from radioactive.gradient import gradient_detect
from radioactive.keys import Key


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demos", type=Path, nargs="+", required=True, help="demo output folders (from-scratch setting)")
    p.add_argument("--references", type=Path, nargs="*", default=[], help="more vanilla models, in the order added")
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--counts", type=int, nargs="+", default=[1, 3])
    p.add_argument("--variants", nargs="*", default=[], help="tags of benchmarks/demo_marking.py runs")
    p.add_argument("--work", type=Path, default=Path("runs/demo_marking"))
    p.add_argument("--results", type=Path, default=Path("benchmarks/results/gradient_temperature.jsonl"))
    a = p.parse_args(argv)
    command = "python benchmarks/gradient_temperature.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    for demo in a.demos:
        key = Key.load(demo / "private" / "key.safetensors")
        seed = json.loads((demo / "summary.json").read_text())["config"]["seed"]
        record = demo / "private" / "record.jsonl"
        suspects = [("marked", record, demo / "models" / "marked.safetensors"),
                    ("vanilla", record, demo / "models" / "vanilla.safetensors")]
        for tag in a.variants:
            work = a.work / f"{demo.name}-{tag}"
            if (work / "marked.safetensors").exists():
                suspects.append((f"marked-{tag}", work / "record.jsonl", work / "marked.safetensors"))
        for name, rec, weights in suspects:
            usable = usable_references(demo, weights, a.references)
            for n in a.counts:
                if n > len(usable):
                    continue
                for t in a.temperatures:
                    r = gradient_detect(rec, key, weights, usable[:n], temperature=t)
                    row = {"demo": str(demo), "demo_seed": seed, "suspect": name, "temperature": t,
                           "references": [str(x) for x in usable[:n]], "log10_pvalue": r.log10_pvalue,
                           "cosines": [round(c, 4) for c in r.cosines], "command": command}
                    append(a.results, row)
                    print(json.dumps({k: row[k] for k in ("demo_seed", "suspect", "temperature", "log10_pvalue")}
                                     | {"n": n}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
