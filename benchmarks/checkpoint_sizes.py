"""Re-save a compressed checkpoint in bfloat16 and report its bytes on disk (the 16-bit 9/16 figure).

    python benchmarks/checkpoint_sizes.py SRC_CHECKPOINT_DIR DST_DIR

Checks that the re-saved checkpoint reloads to bit-identical logits.
"""

import json
import os
import sys

import torch

from sparse_kernels.llm import checkpoint


def main(src: str, dst: str) -> None:
    model, cfg = checkpoint.load(src, dtype=torch.bfloat16)
    out = checkpoint.save(model, dst, layers={n: v["format"] for n, v in cfg["layers"].items()},
                          base_model=cfg.get("base_model"), pruning=cfg.get("pruning"))
    print(json.dumps(out["sizes"], indent=1))
    print({f: os.path.getsize(os.path.join(dst, f)) for f in os.listdir(dst)})
    again, _ = checkpoint.load(dst)
    x = torch.randint(0, 1000, (1, 64))
    with torch.no_grad():
        print("reload logits bit-identical:", torch.equal(model(x).logits, again(x).logits))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
