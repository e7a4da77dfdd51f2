"""Speed and memory of structurally pruned LMs: tokens/s of prefill and decode, parameter bytes.

The model is a randomly initialised Hugging Face Llama built locally from a config (no
download): ``--config smollm2-135m`` copies SmolLM2-135M's shapes (hidden 576, intermediate 1536,
30 layers, 9 query / 3 KV heads, vocab 49152); ``--config tiny`` is a small test shape.
Weights are random, so only speed and memory are meaningful here, not quality.

Variants (each pruned from a copy of the dense model with ``structured_prune``; criterion magnitude):
dense, FFN 25%, FFN 50%, FFN 50% + one KV group of heads, FFN 50% + heads + 25% of the layers.

Correctness first: for every variant the pruned model's logits are compared with the dense
model's with the same units zeroed (must agree within fp32 tolerance), then timed with
``torch.utils.benchmark`` (median, p20, p80 over the measured runs):

* prefill: one forward of ``[batch, seq]`` tokens; tokens/s = batch * seq / time;
* decode: ``generate`` of ``--new`` tokens greedily after a 16-token prompt, KV cache on;
  tokens/s = batch * new / time.

Each is also timed in process CPU time (``time.process_time``, median of ``--cpu-runs`` calls):
on a machine shared with other jobs, wall time swings with their load, CPU time much less;
run with ``--threads 1`` there so CPU time is compute time and not spin-waiting threads.

Writes JSON rows with the environment to ``--out`` (default benchmarks/results/cpu/bench_structured.json).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.utils.benchmark as tb

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sparse_kernels.structured import structured_prune  # noqa: E402
from sparse_kernels.info import cpu_name  # noqa: E402

CONFIGS = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True),
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
}


def variants(cfg):
    g = cfg["num_attention_heads"] // cfg["num_key_value_heads"]
    drop = max(1, cfg["num_hidden_layers"] // 4)
    return [
        ("dense", None),
        ("ffn25", dict(sparsity=0.25)),
        ("ffn50", dict(sparsity=0.5)),
        ("ffn50+heads", dict(sparsity=0.5, heads=g)),
        ("ffn50+heads+layers", dict(sparsity=0.5, heads=g, layers=drop)),
    ]


def masked_copy(dense, rep):
    ref = copy.deepcopy(dense)
    d = ref.config.head_dim
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            info = rep.removed.get(i, {})
            for j in info.get("ffn", []):
                layer.mlp.down_proj.weight[:, j] = 0
            for h in info.get("q_heads", []):
                layer.self_attn.o_proj.weight[:, h * d:(h + 1) * d] = 0
            if i in rep.removed["layers"]:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
    return ref


def _q(ts, p):
    ts = sorted(ts)
    return ts[min(len(ts) - 1, int(p * (len(ts) - 1) + 0.5))]


def timeit(fn, min_run_time, cpu_runs):
    """Wall time (torch.utils.benchmark, median/p20/p80) and, per call, the process CPU time
    (``time.process_time``: on a shared machine it is far less disturbed by other jobs)."""
    m = tb.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    cpu = []
    for _ in range(cpu_runs):
        t = time.process_time()
        fn()
        cpu.append(time.process_time() - t)
    return dict(median=m.median, p20=_q(m.times, 0.2), p80=_q(m.times, 0.8), runs=len(m.times),
                cpu_median=statistics.median(cpu), cpu_p20=_q(cpu, 0.2), cpu_p80=_q(cpu, 0.8), cpu_runs=cpu_runs)


def param_bytes(model):
    seen, n = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            n += p.numel() * p.element_size()
    return n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="smollm2-135m")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--new", type=int, default=16)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--min-run-time", type=float, default=2.0)
    p.add_argument("--cpu-runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu",
                                                 "bench_structured.json"))
    args = p.parse_args(argv)
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    cfg = CONFIGS[args.config]
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg["vocab_size"], (args.batch, args.seq), generator=g)
    prompt = ids[:, :16]
    rows, base = [], None
    for name, kw in variants(cfg):
        if kw is None:
            model, rep, err = copy.deepcopy(dense), None, 0.0
        else:
            model, rep = structured_prune(copy.deepcopy(dense), **kw)
            with torch.no_grad():
                a = model(input_ids=ids[:, :32]).logits
                b = masked_copy(dense, rep)(input_ids=ids[:, :32]).logits
            err = float((a - b).abs().max())
            if not torch.allclose(a, b, atol=1e-4, rtol=1e-4):
                raise SystemExit(f"{name}: pruned model differs from the masked dense model (max err {err:.3e})")
        model = model.to(dtype)
        with torch.no_grad():
            pre = timeit(lambda m=model: m(input_ids=ids), args.min_run_time, args.cpu_runs)
            dec = timeit(lambda m=model: m.generate(prompt, max_new_tokens=args.new, min_new_tokens=args.new,
                                                    do_sample=False, pad_token_id=0), args.min_run_time, args.cpu_runs)
        row = dict(variant=name, options=kw, params=sum(p.numel() for p in model.parameters()),
                   param_bytes=param_bytes(model), check_max_abs_err=err,
                   prefill_tokens_per_s=args.batch * args.seq / pre["median"], prefill_s=pre,
                   decode_tokens_per_s=args.batch * args.new / dec["median"], decode_s=dec,
                   prefill_tokens_per_cpu_s=args.batch * args.seq / pre["cpu_median"],
                   decode_tokens_per_cpu_s=args.batch * args.new / dec["cpu_median"],
                   config={k: getattr(model.config, k) for k in ("num_hidden_layers", "intermediate_size",
                                                                 "num_attention_heads", "num_key_value_heads")})
        if base is None:
            base = row
        row["prefill_speedup"] = row["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]
        row["decode_speedup"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        row["prefill_cpu_speedup"] = row["prefill_tokens_per_cpu_s"] / base["prefill_tokens_per_cpu_s"]
        row["decode_cpu_speedup"] = row["decode_tokens_per_cpu_s"] / base["decode_tokens_per_cpu_s"]
        row["memory_saved"] = 1 - row["param_bytes"] / base["param_bytes"]
        rows.append(row)
        print(f"{name:<20} params {row['params'] / 1e6:7.2f}M ({row['memory_saved']:6.1%} saved)  "
              f"prefill {row['prefill_tokens_per_s']:8.0f} tok/s ({row['prefill_speedup']:.2f}x)  "
              f"decode {row['decode_tokens_per_s']:6.1f} tok/s ({row['decode_speedup']:.2f}x)  "
              f"per CPU-s: prefill {row['prefill_cpu_speedup']:.2f}x decode {row['decode_cpu_speedup']:.2f}x  "
              f"check err {err:.1e}", flush=True)
        del model
    env = dict(device=cpu_name(), threads=torch.get_num_threads(), torch=torch.__version__,
               transformers=transformers.__version__, python=platform.python_version(),
               load_avg=os.getloadavg(),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(env=env, config=dict(vars(args), model=cfg), rows=rows), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
