"""Pruning a mixture-of-experts model: SmolLM2-135M upcycled into a Mixtral-style MoE, perplexity
after pruning every expert with :func:`sparse_kernels.prune`.

There is no MoE model on this machine, so one is made from SmolLM2-135M by sparse upcycling
(Komatsuzaki et al., 2022): each decoder block's MLP is copied into ``--experts`` experts of a
``transformers`` ``MixtralForCausalLM`` (3-D ``gate_up_proj`` / ``down_proj`` parameters), with
a random router (seeded) that sends each token to ``--top-k`` of them, weights renormalized to
sum to 1. The experts start identical, so the dense MoE computes SmolLM2's function (its
perplexity is recorded next to SmolLM2's) while each expert sees its own share of the tokens.
Pruning then gives every expert its own mask and update: with ``calibrate_all_experts=False``
from the tokens routed to it, with ``True`` (the default) from every token.

Rows: dense SmolLM2 pruned (the same calls on ``nn.Linear`` layers, for reference) and the
upcycled MoE pruned, per method and pattern, with the time, the overall sparsity, the number of
expert matrices pruned and the fewest calibration tokens an expert saw. Calibration and
evaluation are the CLI's defaults (32 x 512 Old-Testament tokens, seed 0; 16,384 New-Testament
tokens in 512-token windows, fp32). Writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_linear import smollm2_doc, smollm2_setup, write_json  # noqa: E402


def upcycle_to_mixtral(llama, experts: int = 4, top_k: int = 2, seed: int = 0):
    """A ``MixtralForCausalLM`` whose blocks hold ``llama``'s attention and norms and ``experts``
    copies of its MLP (``gate_up_proj[e] = [gate; up]``, ``down_proj[e] = down``), with a router
    of N(0, 1/hidden) weights drawn from ``seed``."""
    import transformers

    c = llama.config
    cfg = transformers.MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.hidden_size // c.num_attention_heads,
        hidden_act=c.hidden_act, max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings,
        num_local_experts=experts, num_experts_per_tok=top_k, sliding_window=None,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
    moe = transformers.MixtralForCausalLM(cfg).to(llama.dtype).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        moe.model.embed_tokens.weight.copy_(llama.model.embed_tokens.weight)
        moe.model.norm.weight.copy_(llama.model.norm.weight)
        if not c.tie_word_embeddings:
            moe.lm_head.weight.copy_(llama.lm_head.weight)
        for src, dst in zip(llama.model.layers, moe.model.layers):
            dst.self_attn.load_state_dict(src.self_attn.state_dict())
            dst.input_layernorm.load_state_dict(src.input_layernorm.state_dict())
            dst.post_attention_layernorm.load_state_dict(src.post_attention_layernorm.state_dict())
            gate_up = torch.cat([src.mlp.gate_proj.weight, src.mlp.up_proj.weight])
            dst.mlp.experts.gate_up_proj.copy_(gate_up.expand(experts, *gate_up.shape))
            dst.mlp.experts.down_proj.copy_(src.mlp.down_proj.weight.expand(experts, *src.mlp.down_proj.weight.shape))
            dst.mlp.gate.weight.copy_(torch.randn(dst.mlp.gate.weight.shape, generator=g) / c.hidden_size ** 0.5)
    if c.tie_word_embeddings:
        moe.tie_weights()
    return moe


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="magnitude:0.5,wanda:0.5,magnitude:2:4,sparsegpt:2:4")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--skip-dense", action="store_true", help="no rows for the dense SmolLM2")
    ap.add_argument("--int4", type=int, default=None, metavar="G",
                    help="SparseGPT rows: quantize jointly to int4 in groups of G and convert (attention "
                         "SparseLinearInt4, experts SparseExpertsInt4), so perplexity runs on the int4 kernels")
    ap.add_argument("--mask-agreement", type=int, default=0, metavar="L",
                    help="instead: keep the first L blocks, prune SmolLM2 and the MoE (every token to every "
                         "expert) with each config, and record per block how far the MoE's masks and weights "
                         "are from SmolLM2's")
    ap.add_argument("--out", default="benchmarks/results/cpu/moe_smollm2.json")
    args = ap.parse_args(argv)
    from sparse_kernels import prune
    from sparse_kernels.llm import evaluate, models

    configs = [tuple(c.split(":", 1)) for c in args.configs.split(",")]
    llama, src, calib, ev, snap, dense = smollm2_setup(args.eval_tokens)
    if args.mask_agreement:
        return mask_agreement(llama, src, calib, snap, dense, configs, args, argv)
    rows = []
    extra = {}

    def record():  # after every row: a stopped run keeps what it measured
        write_json(smollm2_doc(f"Pruning an upcycled MoE ({src.name} MLPs copied into {args.experts} Mixtral experts, "
                               f"top-{args.top_k}, random router; fp32, CPU) against pruning {src.name} itself",
                               "moe_smollm2.py", argv, args.eval_tokens, dense, rows, **extra), args.out)

    def run(model, kind, method, sparsity, all_experts=None):
        t0 = time.perf_counter()
        opts = {} if all_experts is None else {"calibrate_all_experts": all_experts}
        if args.int4 is not None and method == "sparsegpt":
            opts.update(int4=args.int4, convert=True)
            model = copy.deepcopy(model)  # (converted modules: restore() could not put the dense weights back)
        rep = prune(model, method=method, sparsity=sparsity if ":" in sparsity else float(sparsity),
                    calibration=None if method == "magnitude" else calib, progress=False, **opts)
        secs = time.perf_counter() - t0
        ppl = evaluate.perplexity(model, ev).ppl
        toks = [r.calibration_tokens for r in rep.layers if r.calibration_tokens is not None]
        row = {"model": kind, "method": method, "sparsity": sparsity, "calibrate_all_experts": all_experts,
               **({"int4": opts["int4"], "converted": [n for n in rep.notes if n.startswith("convert:")]}
                  if "int4" in opts else {}),
               "ppl": round(ppl, 3), "prune_s": round(secs, 1), "overall_sparsity": round(rep.overall_sparsity, 4),
               "expert_matrices": sum("[" in r.name for r in rep.layers),
               "min_expert_tokens": min(toks) if toks else None,
               "starved_experts": sum(t == 0 for t in toks)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        record()

    if not args.skip_dense:
        for method, sparsity in configs:
            models.restore(llama, snap)
            run(llama, "SmolLM2-135M (dense MLPs)", method, sparsity)
        models.restore(llama, snap)
    moe = upcycle_to_mixtral(llama, args.experts, args.top_k)
    del llama
    moe_snap = models.snapshot(moe)
    moe_dense = evaluate.perplexity(moe, ev).ppl
    print(f"upcycled MoE dense perplexity {moe_dense:.3f}", flush=True)
    extra.update(moe_ppl_dense=round(moe_dense, 3), moe_parameters=sum(p.numel() for p in moe.parameters()))
    kind = f"SmolLM2-135M upcycled, {args.experts} experts top-{args.top_k}"
    for method, sparsity in configs:
        for all_experts in ((True,) if method == "magnitude" else (True, False)):
            models.restore(moe, moe_snap)
            run(moe, kind, method, sparsity, all_experts)
    record()
    return 0


def mask_agreement(llama, src, calib, snap, dense, configs, args, argv) -> int:
    """Per block, the fraction of mask entries and the relative weight difference between the
    dense model's pruned layers and the upcycled MoE's (expert 0; the experts stay identical when
    every token reaches every expert), on the first ``--mask-agreement`` blocks."""
    from sparse_kernels import prune
    from sparse_kernels.llm import models

    n = args.mask_agreement
    full, full_n = llama.model.layers, llama.config.num_hidden_layers
    rows = []
    for method, sparsity in configs:
        models.restore(llama, snap)
        moe = upcycle_to_mixtral(llama, args.experts, args.top_k)
        for m in (llama, moe):
            m.model.layers = m.model.layers[:n]
            m.config.num_hidden_layers = n
            prune(m, method=method, sparsity=sparsity if ":" in sparsity else float(sparsity),
                  calibration=None if method == "magnitude" else calib, progress=False)
        for i, (d, e) in enumerate(zip(llama.model.layers, moe.model.layers)):
            inter = d.mlp.gate_proj.weight.shape[0]
            gu, down = e.mlp.experts.gate_up_proj[0], e.mlp.experts.down_proj[0]
            pairs = [(f"self_attn.{p}", getattr(d.self_attn, p).weight, getattr(e.self_attn, p).weight)
                     for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
            pairs += [("mlp.gate", d.mlp.gate_proj.weight, gu[:inter]), ("mlp.up", d.mlp.up_proj.weight, gu[inter:]),
                      ("mlp.down", d.mlp.down_proj.weight, down)]
            for name, a, b in pairs:
                rows.append({"method": method, "sparsity": sparsity, "block": i, "layer": name,
                             "mask_agreement": round(((a != 0) == (b != 0)).double().mean().item(), 6),
                             "rel_weight_diff": float(f"{((a - b).norm() / a.norm()).item():.3g}")})
                print(json.dumps(rows[-1]), flush=True)
        del moe
        llama.model.layers, llama.config.num_hidden_layers = full, full_n
        models.restore(llama, snap)
    write_json(smollm2_doc(f"Mask agreement between pruning {src.name} and pruning its upcycled MoE "
                           f"({args.experts} experts, top-{args.top_k}, every token to every expert), "
                           f"first {n} blocks; fp32, CPU", "moe_smollm2.py", argv, args.eval_tokens, dense, rows), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
