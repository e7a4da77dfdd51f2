"""Write the compressed-tensors fixtures under tests/data/compressed_tensors/ with the real library.

The fixtures are checkpoints as llm-compressor writes them, made by compressed-tensors' own
``ModelCompressor`` (its sparse compressors: version 0.12 or earlier; 0.13+ dropped sparse
compression), so tests/test_compressed_tensors.py checks our reader against the real format
without that library installed.  Regenerate (needs compressed-tensors<=0.12, transformers,
safetensors):

    PYTHONPATH=DIR_WITH_COMPRESSED_TENSORS_0_12 python tests/data/make_compressed_tensors_fixtures.py

``quantized_main`` writes five more: the same tiny Llama pruned, then quantized by the library
(FP8 per channel + dynamic per-token activations, INT8 W8A8, int4 groups of 8 in activation order
packed in int32, FP8 in 8x8 blocks, asymmetric INT8 per tensor) and compressed with its
quantization and sparsity compressors; their ``expected.json`` hashes are of the weights the
library dequantizes (:func:`library_decompress`).

Each fixture directory holds ``config.json`` (with ``quantization_config.sparsity_config``),
``model.safetensors`` (compressed by the library) and ``expected.json``: the SHA-256 of every
targeted layer's dense weight as the library decompresses it (``ModelCompressor.decompress``),
token ids, and the logits of the dense pruned model (float32, rounded to 1e-4).
"""

import hashlib
import json
import os
import sys

import torch

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compressed_tensors")


def tiny_llama(dtype, arch="llama", hidden=32, intermediate=72):
    import transformers

    # intermediate 72: down_proj has 72 input columns, not a multiple of 16 (our padded path)
    kw = dict(vocab_size=64, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    if arch == "qwen2":  # biases on q/k/v, tied embeddings
        cfg = transformers.Qwen2Config(tie_word_embeddings=True, **kw)
    else:
        cfg = transformers.LlamaConfig(tie_word_embeddings=False, **kw)
    torch.manual_seed(0)
    # built in `dtype` as from_pretrained(dtype=...) builds it: the rotary inv_freq stays float32
    m = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so that the logits differ visibly
        for n, p in m.named_parameters():
            if p.dim() == 2 or n.endswith(".bias"):
                p.normal_(0, 0.3)
    return m


def prune(m, structure, embedding=False):
    g = torch.Generator().manual_seed(1)
    kinds = (torch.nn.Linear, torch.nn.Embedding) if embedding else (torch.nn.Linear,)
    with torch.no_grad():
        for name, mod in m.named_modules():
            if not isinstance(mod, kinds) or name == "lm_head":
                continue
            w = mod.weight
            if structure == "2:4":
                grp = w.view(-1, 4)
                keep = torch.zeros_like(grp, dtype=torch.bool).scatter_(1, grp.abs().topk(2, dim=1).indices, True)
                grp.mul_(keep)
                # groups with one and with no nonzero left: the library's top-2 then picks zeros
                grp[::7, :].mul_(torch.tensor([1, 0, 0, 0], dtype=w.dtype))
                grp[3::11, :] = 0
            else:
                w.mul_(torch.rand(w.shape, generator=g) >= 0.5)


def sha(t):
    return hashlib.sha256(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()).hexdigest()


def main():
    from compressed_tensors import __version__ as ct_version
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig
    from safetensors.torch import save_file

    for name, arch, structure, dtype, scfg in [
        ("llama_2of4_bf16", "llama", "2:4", torch.bfloat16,
         Sparse24BitMaskConfig(targets=["Linear"], ignore=["lm_head"])),
        ("llama_unstructured_fp16", "llama", "unstructured", torch.float16,
         BitmaskConfig(targets=["Linear"], ignore=["lm_head"])),
        # attention biases, tied embeddings, and the (tied) embedding compressed too
        ("qwen2_unstructured_bias_tied_fp32", "qwen2", "unstructured", torch.float32,
         BitmaskConfig(targets=["Linear", "Embedding"], ignore=["lm_head"])),
    ]:
        out = os.path.join(HERE, name)
        os.makedirs(out, exist_ok=True)
        m = tiny_llama(dtype, arch)
        prune(m, structure, embedding=arch == "qwen2")
        ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            logits = m(input_ids=ids, use_cache=False).logits.float()
        comp = ModelCompressor(sparsity_config=scfg)
        sd = comp.compress(m)
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(out, "model.safetensors"),
                  metadata={"format": "pt"})
        m.config.save_pretrained(out)
        comp.update_config(out)
        # what the library itself decompresses the checkpoint to
        fresh = tiny_llama(dtype, arch)
        comp.decompress(out, fresh)
        fresh.tie_weights()  # decompress assigns new Parameters; transformers' loader ties them again
        layers = {n: sha(mod.weight) for n, mod in fresh.named_modules()
                  if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)) and n != "lm_head"}
        biases = {n: sha(mod.bias) for n, mod in fresh.named_modules()
                  if isinstance(mod, torch.nn.Linear) and mod.bias is not None}
        assert all(torch.equal(fresh.get_submodule(n).weight, m.get_submodule(n).weight) for n in layers)
        with open(os.path.join(out, "expected.json"), "w") as f:
            json.dump({"compressed_tensors_version": ct_version, "structure": structure,
                       "dtype": str(dtype).replace("torch.", ""), "weight_sha256": layers, "bias_sha256": biases,
                       "input_ids": ids.tolist(),
                       "logits": [[[round(v, 4) for v in row] for row in seq] for seq in logits.tolist()]},
                      f, indent=1)
        print(out, sorted(os.listdir(out)), file=sys.stderr)


# ------------------------------------------------------------------ quantized + sparse (dequantized on load)
def set_qparams(m):
    """Fill every quantized module's weight scale / zero point (and g_idx, input_scale) from its
    weight, as an observer would (min/max per strategy, then the library's calculate_qparams)."""
    from compressed_tensors.quantization.utils import calculate_qparams

    g = torch.Generator().manual_seed(3)
    for _, mod in m.named_modules():
        scheme = getattr(mod, "quantization_scheme", None)
        if scheme is None or scheme.weights is None:
            continue
        a, w = scheme.weights, mod.weight.detach().float()
        rows, cols = w.shape
        if a.strategy == "tensor":
            lo, hi = w.amin(), w.amax()
        elif a.strategy == "channel":
            lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        elif a.strategy == "group":
            if getattr(mod, "weight_g_idx", None) is not None:  # activation order: a column permutation
                perm = torch.randperm(cols, generator=g)
                g_idx = torch.empty(cols, dtype=torch.int32)
                g_idx[perm] = (torch.arange(cols) // a.group_size).to(torch.int32)
                mod.weight_g_idx.data.copy_(g_idx)
                w = w[:, torch.argsort(g_idx, stable=True)]
            grp = w.reshape(rows, cols // a.group_size, a.group_size)
            lo, hi = grp.amin(-1), grp.amax(-1)
        else:  # block
            bh, bw = a.block_structure
            blk = w.reshape(rows // bh, bh, cols // bw, bw)
            lo, hi = blk.amin((1, 3)), blk.amax((1, 3))
        scale, zp = calculate_qparams(lo, hi, a)
        mod.weight_scale.data.copy_(scale.reshape(mod.weight_scale.shape))
        if getattr(mod, "weight_zero_point", None) is not None:
            mod.weight_zero_point.data.copy_(zp.reshape(mod.weight_zero_point.shape))


def library_decompress(path, model):
    """Load the quantized (and sparse) checkpoint ``path`` into ``model`` (built from its config)
    with compressed-tensors, weights dequantized, by the path transformers takes
    (run_compressed=False): compress_model for the parameter layout, the stored tensors assigned,
    then decompress_model in memory.  (The disk path, ModelCompressor.decompress, casts an int8
    model's scales to bfloat16, fails on static input scales, and leaves the unquantized tensors
    of a quantized checkpoint unloaded.)"""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config
    from safetensors.torch import load_file

    with open(os.path.join(path, "config.json")) as f:
        comp = ModelCompressor.from_compression_config(json.load(f)["quantization_config"])
    apply_quantization_config(model, comp.quantization_config)
    set_qparams(model)  # any valid scales: compress_model only has to lay the parameters out
    comp.compress_model(model)
    stored = load_file(os.path.join(path, "model.safetensors"))
    have = dict(model.named_parameters())  # tied parameters once
    assert set(stored) <= set(have) and all(p.is_floating_point() for k, p in have.items() if k not in stored), \
        sorted(set(stored) ^ set(have))
    for k, t in stored.items():  # assigned, not copied: a bitmask's length depends on the data
        owner, attr = k.rsplit(".", 1)
        setattr(model.get_submodule(owner), attr, torch.nn.Parameter(t, requires_grad=False))
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [k for k, p in model.named_parameters() if k not in stored]
    assert not missing, f"not stored and not tied: {missing}"
    comp.decompress_model(model)
    return model


def write_quantized(out, dtype, structure, qcfg, scfg, fmt, **size):
    """The tiny Llama pruned (``structure``), quantized by the library (``qcfg``, scales from
    :func:`set_qparams`) and written to ``out`` by its ModelCompressor (``fmt``, sparsity ``scfg``)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationStatus, apply_quantization_config
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    m = tiny_llama(dtype, **size)
    prune(m, structure)
    apply_quantization_config(m, qcfg)
    set_qparams(m)
    for mod in m.modules():
        if hasattr(mod, "quantization_scheme"):
            mod.quantization_status = QuantizationStatus.FROZEN
    comp = ModelCompressor.from_pretrained_model(m, sparsity_config_or_format=scfg, quantization_format=fmt)
    sd = comp.compress(m)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(out, "model.safetensors"),
              metadata={"format": "pt"})
    m.config.save_pretrained(out)
    comp.update_config(out)


def write_expected(out, fresh, ids, **fields):
    """``out``/expected.json for a model the library dequantized (``fresh``): the SHA-256 of every
    Linear weight but lm_head, their dtypes, and the logits with activation quantization off."""
    from compressed_tensors import __version__ as ct_version

    layers = {n: sha(mod.weight) for n, mod in fresh.named_modules()
              if isinstance(mod, torch.nn.Linear) and n != "lm_head"}
    dtypes = sorted({str(fresh.get_submodule(n).weight.dtype).replace("torch.", "") for n in layers})
    for n in layers:  # the logits of the dequantized weights (activations not quantized)
        fresh.get_submodule(n).quantization_enabled = False
    with torch.no_grad():
        logits = fresh(input_ids=ids, use_cache=False).logits.float()
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump({"compressed_tensors_version": ct_version, **fields, "weight_dtypes": dtypes,
                   "weight_sha256": layers, "input_ids": ids.tolist(),
                   "logits": [[[round(v, 4) for v in row] for row in seq] for seq in logits.tolist()]}, f, indent=1)
    print(out, sorted(os.listdir(out)), dtypes, file=sys.stderr)


def quantized_main():
    from compressed_tensors.config import BitmaskConfig, DenseSparsityConfig, Sparse24BitMaskConfig
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    def args(**kw):
        return QuantizationArgs(**kw)

    fp8_token = args(num_bits=8, type="float", strategy="token", dynamic=True, symmetric=True)
    for name, structure, dtype, scfg, fmt, weights, acts in [
        # RedHatAI's Sparse-Llama-*-2of4-FP8-dynamic recipe: FP8 per-channel weights, dynamic per-token activations
        ("llama_2of4_fp8_dynamic_bf16", "2:4", torch.bfloat16,
         Sparse24BitMaskConfig(targets=["Linear"], ignore=["lm_head"]), "float-quantized",
         args(num_bits=8, type="float", strategy="channel", symmetric=True), fp8_token),
        # INT8 W8A8, dynamic per-token activations (a static input_scale breaks the library's own
        # decompress of a sparse checkpoint: AttributeError on input_scale)
        ("llama_2of4_int8_w8a8_fp16", "2:4", torch.float16,
         Sparse24BitMaskConfig(targets=["Linear"], ignore=["lm_head"]), "int-quantized",
         args(num_bits=8, type="int", strategy="channel", symmetric=True),
         args(num_bits=8, type="int", strategy="token", symmetric=True, dynamic=True)),
        # W4A16, groups of 8 in activation order (g_idx), packed in int32; 2:4 recorded in a dense sparsity config
        ("llama_2of4_w4a16_actorder_fp16", "2:4", torch.float16,
         DenseSparsityConfig(targets=["Linear"], ignore=["lm_head"], sparsity_structure="2:4"), "pack-quantized",
         args(num_bits=4, type="int", strategy="group", group_size=8, symmetric=True, actorder="group"), None),
        # FP8 weights in 8x8 blocks, unstructured bitmask
        ("llama_unstructured_fp8_block_bf16", "unstructured", torch.bfloat16,
         BitmaskConfig(targets=["Linear"], ignore=["lm_head"]), "float-quantized",
         args(num_bits=8, type="float", strategy="block", block_structure=[8, 8], symmetric=True), None),
        # asymmetric INT8 per tensor: a pruned weight quantizes to the zero point, not to 0
        ("llama_unstructured_int8_asym_fp32", "unstructured", torch.float32,
         BitmaskConfig(targets=["Linear"], ignore=["lm_head"]), "int-quantized",
         args(num_bits=8, type="int", strategy="tensor", symmetric=False), None),
    ]:
        out = os.path.join(HERE, name)
        qcfg = QuantizationConfig(config_groups={"group_0": QuantizationScheme(
            targets=["Linear"], weights=weights, input_activations=acts)}, ignore=["lm_head"])
        write_quantized(out, dtype, structure, qcfg, scfg, fmt)
        ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
        write_expected(out, library_decompress(out, tiny_llama(dtype)), ids, structure=structure, quantization=fmt,
                       dtype=str(dtype).replace("torch.", ""))


def marlin24_main():
    """2:4 weights in Marlin's layout (``marlin-24``, what llm-compressor writes for a 2:4 W4A16
    model): ``llama_2of4_w4a16_marlin24_fp16`` int4 in groups of 128 (the format's only group
    size), ``llama_2of4_w8a16_channel_marlin24_fp16`` int8 per channel.  Marlin's tiles need
    multiples of 64 features; at 512 input features the group scales are shuffled too.
    compressed-tensors cannot decompress this format, so the expected hashes come from the same
    quantized model written as ``pack-quantized`` and dequantized by the library (the same math:
    ``q * scale`` in float16)."""
    import tempfile

    from compressed_tensors.config import DenseSparsityConfig
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    dtype = torch.float16
    for name, size, weights in [  # 512 columns: down_proj's scales are shuffled too
        ("llama_2of4_w4a16_marlin24_fp16", dict(hidden=128, intermediate=512),
         QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=128, symmetric=True)),
        ("llama_2of4_w8a16_channel_marlin24_fp16", dict(hidden=128, intermediate=256),
         QuantizationArgs(num_bits=8, type="int", strategy="channel", symmetric=True)),
    ]:
        out = os.path.join(HERE, name)
        qcfg = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                                  ignore=["lm_head"])
        scfg = DenseSparsityConfig(targets=["Linear"], ignore=["lm_head"], sparsity_structure="2:4")
        ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
        with tempfile.TemporaryDirectory() as twin:
            for fmt, where in (("marlin-24", out), ("pack-quantized", twin)):
                write_quantized(where, dtype, "2:4", qcfg, scfg, fmt, **size)
            fresh = library_decompress(twin, tiny_llama(dtype, **size))
        write_expected(out, fresh, ids, structure="2:4", quantization="marlin-24", dtype="float16")

if __name__ == "__main__":
    main()
    quantized_main()
    marlin24_main()
