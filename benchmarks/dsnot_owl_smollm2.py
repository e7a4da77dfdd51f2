"""Why DSnoT and OWL do not combine on SmolLM2-135M-Instruct (Wanda, 70%): perplexity and the
relative output error of every block, with and without DSnoT and OWL, and with DSnoT left out of
one block (``--skip-block``, 11 by default: the block whose error DSnoT raises).

The configurations: uniform 70%; DSnoT; OWL; OWL + DSnoT; and the two DSnoT ones again with the
block ``--skip-block`` unrefined (done by wrapping ``PruningMethod.prune_block`` for this
diagnosis: ``prune(dsnot=...)`` has no per-block switch).  Calibration and evaluation are the
CLI's defaults (fp32).  Writes JSON to ``--out``: per configuration the perplexity, the blocks'
output errors (``PruneReport.block_output_error``) and the skipped block's per-layer errors and
swap counts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_linear import smollm2_doc, smollm2_setup, write_json  # noqa: E402
from sparse_kernels.llm import demo, evaluate, models  # noqa: E402
from sparse_kernels.pruning import model as PM  # noqa: E402

CONFIGS = [("uniform", {}, False), ("dsnot", {"dsnot": True}, False), ("owl", {"owl": True}, False),
           ("owl+dsnot", {"owl": True, "dsnot": True}, False), ("dsnot, block skipped", {"dsnot": True}, True),
           ("owl+dsnot, block skipped", {"owl": True, "dsnot": True}, True)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip-block", type=int, default=11)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--out", default="benchmarks/results/cpu/dsnot_owl_smollm2.json")
    args = ap.parse_args(argv)
    original = PM.PruningMethod.prune_block
    skip = {"on": False}

    def prune_block(self, block_index, block, layers, stats, spec, options):
        if skip["on"] and block_index == args.skip_block and options.get("_dsnot") is not None:
            options = dict(options, _dsnot=None)
        return original(self, block_index, block, layers, stats, spec, options)

    PM.PruningMethod.prune_block = prune_block
    model, src, calib, ev, snap, dense = smollm2_setup(args.eval_tokens)
    rows = []
    for label, kw, skip_block in CONFIGS:
        models.restore(model, snap)
        skip["on"] = skip_block
        rep = demo.prune_model(model, "wanda", "70%", calib, progress=False, **kw)
        row = {"config": label, "ppl": round(evaluate.perplexity(model, ev, progress=False).ppl, 3),
               "block_output_error": [round(e, 4) for e in rep.block_output_error],
               f"block_{args.skip_block}_layers": [
                   {"layer": r.name, "sparsity": round(r.sparsity, 4), "output_error": round(r.output_error, 4),
                    "dsnot_swaps": r.dsnot_swaps} for r in rep.layers if r.block == args.skip_block]}
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("config", "ppl")}), flush=True)
    write_json(smollm2_doc(f"DSnoT with and without OWL on {src.name} (Wanda 70%, fp32, CPU): perplexity and block "
                           f"output errors", "dsnot_owl_smollm2.py", argv, args.eval_tokens, dense, rows,
                           skipped_block=args.skip_block), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
