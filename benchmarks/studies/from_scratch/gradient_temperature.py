"""The gradient test's temperature T on the demo replicates, with 1, 2, ... references.

For each replicate folder (written by `radioactive demo` or demo_replicates.py), its marked suspect and its
vanilla control, and the marked suspects that demo_marking.py trained for it (``--variants``: the tags of those
runs, read from ``--work``), are tested with every temperature and number of references. References follow
demo_references.py (scripts of this folder): the replicate's own, then ``--references`` in order, never its
marking network nor a model trained with the suspect's own seed. One JSON line per test is appended to
``--results``.

    python benchmarks/studies/from_scratch/gradient_temperature.py \
        --demos demo-output runs/demo_replicates/from-scratch-seed{1,2} \
        --references ... --temperatures 1 2 4 --counts 1 3 --variants psnr40.5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from radioactive.gradient import gradient_detect
from radioactive.keys import Key

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/, for _common
from _common import RESULTS, append_result, command_line  # noqa: E402
from demo_references import usable_references  # noqa: E402  (a script of this folder)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demos", type=Path, nargs="+", required=True, help="demo output folders (from-scratch setting)")
    p.add_argument("--references", type=Path, nargs="*", default=[], help="more vanilla models, in the order added")
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--counts", type=int, nargs="+", default=[1, 3])
    p.add_argument("--variants", nargs="*", default=[], help="tags of benchmarks/studies/from_scratch/demo_marking.py runs")
    p.add_argument("--work", type=Path, default=Path("runs/demo_marking"))
    p.add_argument("--results", type=Path, default=RESULTS / "gradient_temperature.jsonl")
    a = p.parse_args(argv)
    command = command_line(__file__, argv or sys.argv[1:])
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
                           "cosines": [round(c, 4) for c in r.cosines]}
                    row = append_result(a.results, row, command)
                    print(json.dumps({k: row[k] for k in ("demo_seed", "suspect", "temperature", "log10_pvalue")}
                                     | {"n": n}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
