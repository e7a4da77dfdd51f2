"""Re-save a compressed checkpoint in bfloat16 and report its bytes on disk (the 16-bit 9/16 figure).

    python benchmarks/checkpoint_sizes.py SRC_CHECKPOINT_DIR DST_DIR
"""
import json, os, sys, torch
from sparse_kernels.llm import checkpoint
src = sys.argv[1]; dst = sys.argv[2]
m, cfg = checkpoint.load(src, dtype=torch.bfloat16)
out = checkpoint.save(m, dst, layers={n: v["format"] for n, v in cfg["layers"].items()},
                      base_model=cfg.get("base_model"), pruning=cfg.get("pruning"))
print(json.dumps(out["sizes"], indent=1))
files = {f: os.path.getsize(os.path.join(dst, f)) for f in os.listdir(dst)}
print(files)
m2, _ = checkpoint.load(dst)
x = torch.randint(0, 1000, (1, 64))
with torch.no_grad():
    print("reload logits equal:", torch.equal(m(x).logits, m2(x).logits))
