"""compressed-tensors interop: the 2:4 bitmask <-> meta conversions, reading llm-compressor's
sparse checkpoints (fixtures written by compressed-tensors 0.12.2 itself, see
tests/data/make_compressed_tensors_fixtures.py) and writing them back.

When a compressed-tensors with sparse compressors (<= 0.12) is importable, the checkpoints we write
are also decompressed by it and compared bit for bit; otherwise those tests skip.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn

import sparse_kernels as sk
from conftest import assert_bitexact, assert_matmul_close, save_word_model_dir

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.torch import load_file, save_file  # noqa: E402

from sparse_kernels import cli  # noqa: E402
from sparse_kernels.llm import compressed_tensors as ct  # noqa: E402
from sparse_kernels.llm import models  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "data", "compressed_tensors")
FIX24, FIXBM = os.path.join(DATA, "llama_2of4_bf16"), os.path.join(DATA, "llama_unstructured_fp16")
FIXQW = os.path.join(DATA, "qwen2_unstructured_bias_tied_fp32")  # biases, tied and compressed embedding
# quantized and sparse, as llm-compressor writes them (weights dequantized on load)
FIXFP8 = os.path.join(DATA, "llama_2of4_fp8_dynamic_bf16")  # FP8 per channel + dynamic per-token acts
FIXINT8 = os.path.join(DATA, "llama_2of4_int8_w8a8_fp16")  # INT8 per channel + dynamic per-token acts
FIXW4 = os.path.join(DATA, "llama_2of4_w4a16_actorder_fp16")  # int4 groups of 8, activation order, packed
FIXFP8BLK = os.path.join(DATA, "llama_unstructured_fp8_block_bf16")  # FP8 8x8 blocks, sparse-bitmask
FIXASYM = os.path.join(DATA, "llama_unstructured_int8_asym_fp32")  # INT8 per tensor with a zero point
FIXMARLIN = os.path.join(DATA, "llama_2of4_w4a16_marlin24_fp16")  # int4 2:4 in Marlin's layout, groups of 128
FIXMARLIN8 = os.path.join(DATA, "llama_2of4_w8a16_channel_marlin24_fp16")  # int8 per channel, Marlin's layout


def _int_view(t):
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _ct_encode(w: torch.Tensor):
    """compressed-tensors' 2:4 encoding written independently: numpy little-endian packbits of the
    kept positions and the kept values in row-major order (kept = the two largest |w| of each group,
    lower index first on ties, so that zeros can be kept too)."""
    g = w.float().abs().reshape(-1, 4)
    order = torch.argsort(-g, dim=1, stable=True)[:, :2]
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(1, order, True).reshape(w.shape)
    bitmask = torch.from_numpy(np.packbits(keep.numpy(), axis=-1, bitorder="little"))
    return w[keep].reshape(w.shape[0], -1), bitmask, keep


def _random_24(rows, cols, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    w = torch.where(sk.mask_2to4(w), w, torch.zeros((), dtype=dtype))
    w[0, :4] = 0  # an all-zero group
    w[1, :4] = torch.tensor([-0.0, 0.0, 3.0, 0.0]).to(dtype)  # one nonzero; the kept zero is -0.0
    return w


# ------------------------------------------------------------------ the conversions
@pytest.mark.parametrize("cols", [4, 8, 12, 16, 20, 72, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_from_compressed_tensors_24_is_bit_exact(cols, dtype):
    w = _random_24(7, cols, dtype, seed=cols)
    compressed, bitmask, keep = _ct_encode(w)
    values, meta = sk.from_compressed_tensors_24(compressed, bitmask, cols)
    padded = (cols + 15) // 16 * 16
    assert values.shape == (7, padded // 2) and meta.shape == (7, padded // 16) and meta.dtype == torch.int16
    dense = sk.decompress_2to4(values, meta)
    assert bool(torch.signbit(w[1, 0])) and w[1, 0] == 0 and keep[1, 0]  # a kept -0.0 must come back -0.0
    assert_bitexact(_int_view(dense[:, :cols]), _int_view(w), "decompressed weight (bits, -0.0 included)")
    assert_bitexact(dense[:, cols:], torch.zeros(7, padded - cols, dtype=dtype), "padding columns")
    # the kept positions are the bitmask's, not re-chosen (zeros kept in sparse groups stay put)
    nib = sk.reference.sparse24.meta_nibbles(meta)[:, : cols // 4]
    got_keep = torch.zeros(7, cols // 4, 4, dtype=torch.bool)
    got_keep.scatter_(2, torch.stack((nib & 3, nib >> 2), -1), True)
    assert_bitexact(got_keep.reshape(7, cols), keep, "kept positions")
    back_c, back_b = sk.to_compressed_tensors_24(values, meta, cols)
    assert_bitexact(back_b, bitmask, "bitmask round trip")
    assert_bitexact(_int_view(back_c), _int_view(compressed), "compressed round trip")


def test_to_compressed_tensors_24_from_our_compressor():
    w = _random_24(33, 48, torch.bfloat16, seed=3)
    values, meta = sk.compress_2to4(w)
    compressed, bitmask = sk.to_compressed_tensors_24(values, meta)
    keep = torch.from_numpy(np.unpackbits(bitmask.numpy(), axis=-1, count=48, bitorder="little")).bool()
    assert bool((keep.reshape(33, 12, 4).sum(-1) == 2).all())
    dense = torch.zeros(33, 48, dtype=torch.bfloat16)
    dense[keep] = compressed.flatten()
    assert_bitexact(_int_view(dense), _int_view(w), "compressed-tensors' decompression of our export")


def test_compressed_tensors_24_conversions_reject_bad_input():
    w = _random_24(4, 16, torch.float16)
    c, b, _ = _ct_encode(w)
    bad = b.clone()
    bad[2, 1] |= 0x0F  # row 2, columns 8..11: four kept
    with pytest.raises(ValueError, match=r"row 2, columns 8\.\.11 mark 4 kept columns \(exactly 2 needed\)"):
        sk.from_compressed_tensors_24(c, bad, 16)
    c12, b12, _ = _ct_encode(w[:, :12])
    b12[0, 1] |= 0x10  # column 12 of a 12-column weight
    with pytest.raises(ValueError, match="bits set past column 12"):
        sk.from_compressed_tensors_24(c12, b12, 12)
    with pytest.raises(ValueError, match=r"bitmask has shape \(4, 2\); a \[4, 24\] weight needs \(4, 3\)"):
        sk.from_compressed_tensors_24(c, b, 24)
    with pytest.raises(ValueError, match=r"compressed has shape \(4, 7\)"):
        sk.from_compressed_tensors_24(c[:, :7], b, 16)
    with pytest.raises(ValueError, match="cols must be a positive multiple of 4"):
        sk.from_compressed_tensors_24(c, b, 14)
    with pytest.raises(TypeError, match="bitmask"):
        sk.from_compressed_tensors_24(c, b.to(torch.int8), 16)
    with pytest.raises(TypeError, match="compressed"):
        sk.from_compressed_tensors_24(c.to(torch.int16), b, 16)
    values, meta = sk.compress_2to4(torch.nn.functional.pad(w[:, :12], (0, 4)))
    values[0, -1] = 1.0
    with pytest.raises(ValueError, match="nonzeros past column 12"):
        sk.to_compressed_tensors_24(values, meta, 12)
    with pytest.raises(ValueError, match="does not fit values of 16 columns"):
        sk.to_compressed_tensors_24(values, meta, 32)
    meta[1, 0] = 0x0003  # i0 = 3 >= i1 = 0
    with pytest.raises(ValueError, match="meta is corrupt: row 1"):
        sk.to_compressed_tensors_24(values, meta)


# ------------------------------------------------------------------ reading llm-compressor's checkpoints
def _expected(path):
    with open(os.path.join(path, "expected.json")) as f:
        return json.load(f)


def _sha(t):
    return hashlib.sha256(t.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _weight(mod):
    return mod.dense_weight() if isinstance(mod, sk.SparseLinear) else mod.weight.detach()


def _logits(m, ids):
    with torch.no_grad():
        return m(input_ids=ids, use_cache=False).logits.float()


@pytest.mark.parametrize("path, pattern", [(FIX24, "2:4"), (FIXBM, "bitmask"), (FIXQW, "bitmask")],
                         ids=["2of4", "unstructured", "qwen2-bias-tied-embedding"])
def test_load_llm_compressor_checkpoint(path, pattern):
    exp = _expected(path)
    m, info = ct.load(path)
    assert info.sparsity_config["format"] == (ct.FORMAT_24 if pattern == "2:4" else ct.FORMAT_BITMASK)
    linear = {n for n in exp["weight_sha256"] if n != "model.embed_tokens"}
    assert linear == set(info.layers) and set(info.layers.values()) == {pattern}
    for name, digest in exp["weight_sha256"].items():
        mod = m.get_submodule(name)
        if name == "model.embed_tokens":  # a compressed Embedding comes back dense
            assert isinstance(mod, nn.Embedding) and _sha(mod.weight) == digest
            continue
        assert isinstance(mod, sk.SparseLinear) and mod.pattern == pattern, name
        assert _sha(_weight(mod)) == digest, f"{name}: the weight differs from compressed-tensors' decompression"
    for name, digest in exp["bias_sha256"].items():
        assert _sha(m.get_submodule(name).bias) == digest, f"{name}: bias"
    assert len(exp["bias_sha256"]) == (6 if path == FIXQW else 0)
    assert isinstance(m.lm_head, nn.Linear) and not isinstance(m.lm_head, sk.SparseLinear)  # ignored: dense
    assert (m.lm_head.weight is m.model.embed_tokens.weight) == (path == FIXQW)  # tied again
    dtype = getattr(torch, exp["dtype"])
    assert m.model.embed_tokens.weight.dtype == dtype and m.model.rotary_emb.inv_freq.dtype == torch.float32
    ids = torch.tensor(exp["input_ids"])
    # the library's dense model's logits: the same model decompressed (convert=False) matches them
    dense, dinfo = ct.load(path, convert=False)
    assert not dinfo.layers and not any(isinstance(x, sk.SparseLinear) for x in dense.modules())
    torch.testing.assert_close(_logits(dense, ids), torch.tensor(exp["logits"]), atol=2e-4, rtol=0)
    exact = _logits(dense.double(), ids)
    lowp = _logits(ct.load(path, convert=False)[0], ids)
    for backend in ("reference", "cpp"):
        for mod in m.modules():
            if isinstance(mod, sk.SparseLinear):
                mod.backend = backend
                mod.refresh_cache()
        assert_matmul_close(_logits(m, ids), exact, lowp, f"logits ({backend})")


def test_load_unstructured_as_dense_and_the_model_source():
    m, info = ct.load(FIXBM, unstructured="dense")
    assert set(info.layers.values()) == {"dense"} and not any(isinstance(x, sk.SparseLinear) for x in m.modules())
    exp = _expected(FIXBM)
    for name, digest in exp["weight_sha256"].items():
        assert _sha(m.get_submodule(name).weight) == digest
    src = models.resolve(FIX24)
    assert src.kind == "compressed-tensors"
    with pytest.raises(ValueError, match="unstructured: got 'csr'"):
        ct.load(FIXBM, unstructured="csr")
    m2, _ = ct.load(FIX24, dtype=torch.float32)
    assert m2.model.layers[0].mlp.down_proj.values.dtype == torch.float32


def _copy(src, tmp_path, name="ckpt"):
    d = tmp_path / name
    shutil.copytree(src, d)
    os.remove(d / "expected.json")
    return d


def _edit_config(d, fn):
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(d, fn):
    t = load_file(str(d / "model.safetensors"))
    fn(t)
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})


def test_load_sharded_checkpoint(tmp_path):
    d = _copy(FIX24, tmp_path)
    t = load_file(str(d / "model.safetensors"))
    keys = sorted(t)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for f, ks in halves.items():
        save_file({k: t[k] for k in ks}, str(d / f), metadata={"format": "pt"})
    os.remove(d / "model.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in halves.items() for k in ks}}))
    m, info = ct.load(str(d))
    for name, digest in _expected(FIX24)["weight_sha256"].items():
        assert _sha(_weight(m.get_submodule(name))) == digest
    os.remove(d / "model-00002-of-00002.safetensors")
    with pytest.raises(ct.CompressedTensorsError, match="model-00002-of-00002.safetensors.*missing"):
        ct.load(str(d))


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.pop("quantization_config"), "quant_method is None, expected 'compressed-tensors'"),
    (lambda c: c["quantization_config"].update(config_groups={"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float"}}}, format="float-quantized", ignore=["lm_head"]),
     "config group 'group_0' quantizes 'model.layers.0.self_attn.q_proj' \\(float-quantized\\) but "
     "model.layers.0.self_attn.q_proj.weight_scale is missing"),
    (lambda c: c["quantization_config"].update(config_groups={"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 8}}},
        format="marlin-24"), "marlin-24 holds symmetric int4/int8 weights per channel or per group of 128, got "
                             "int4 per group 8"),
    (lambda c: c["quantization_config"].update(config_groups={"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "float"}}}, format="nvfp4-pack-quantized"),
     "quantization format 'nvfp4-pack-quantized' \\(FP4 weights\\) is not supported"),
    (lambda c: c["quantization_config"]["sparsity_config"].update(format="marlin-24"),
     "sparsity format 'marlin-24' is not supported"),
    (lambda c: c["quantization_config"].update(transform_config={"config_groups": {"u": {}}}), "transform_config"),
    (lambda c: c.pop("model_type"), "model_type is missing"),
])
def test_load_rejects_configs_it_cannot_run(tmp_path, edit, match):
    d = _copy(FIX24, tmp_path)
    _edit_config(d, edit)
    with pytest.raises(ct.CompressedTensorsError, match=match):
        ct.load(str(d))


def _bad_bitmask(t):
    t["model.layers.1.self_attn.q_proj.bitmask"][5, 0] = 0x07  # row 5, columns 0..3: three kept


@pytest.mark.parametrize("fixture, edit, match", [
    (FIX24, _bad_bitmask, r"model.layers.1.self_attn.q_proj: .*row 5, columns 0\.\.3 mark 3 kept columns"),
    (FIX24, lambda t: t.pop("model.layers.0.mlp.up_proj.bitmask"), r"up_proj.bitmask is missing"),
    (FIX24, lambda t: t.update({"model.layers.0.mlp.up_proj.shape": torch.tensor([[72], [28]])}),
     r"compressed has shape \(72, 16\); a 2:4 \[72, 28\] weight keeps \(72, 14\)"),
    (FIX24, lambda t: t.update({"model.layers.0.mlp.up_proj.shape": torch.tensor([[72.0], [32.0]])}),
     "expected two integers"),
    (FIX24, lambda t: t.pop("model.norm.weight"), "Missing key.*model.norm.weight"),
    (FIX24, lambda t: t.update({"model.layers.0.mlp.bogus.compressed": torch.zeros(2, 2),
                                "model.layers.0.mlp.bogus.bitmask": torch.zeros(2, 1, dtype=torch.uint8),
                                "model.layers.0.mlp.bogus.shape": torch.tensor([[2], [4]])}),
     "'model.layers.0.mlp.bogus' is not a module"),
    (FIXBM, lambda t: t["model.layers.0.mlp.gate_proj.row_offsets"].add_(1), "row_offsets do not match"),
    (FIXBM, lambda t: t.update({"model.layers.0.mlp.gate_proj.compressed":
                                t["model.layers.0.mlp.gate_proj.compressed"][:-1].clone()}),
     "bitmask marks 1140 elements but compressed holds 1139"),
    # offsets shifted by one and a value prepended: every row's count still matches
    (FIXBM, lambda t: t.update({"model.layers.0.mlp.gate_proj.row_offsets": t["model.layers.0.mlp.gate_proj.row_offsets"] + 1,
                                "model.layers.0.mlp.gate_proj.compressed": torch.cat((
                                    torch.ones(1, dtype=torch.float16), t["model.layers.0.mlp.gate_proj.compressed"]))}),
     "gate_proj: the bitmask marks 1140 elements but compressed holds 1141"),
    (FIX24, lambda t: [t.pop(k) for k in [k for k in t if k.endswith((".compressed", ".bitmask", ".shape"))]],
     "says sparsity format 'sparse-24-bitmask' but the tensors hold no compressed weight"),
])
def test_load_rejects_corrupt_tensors(tmp_path, fixture, edit, match):
    d = _copy(fixture, tmp_path)
    _edit_tensors(d, edit)
    with pytest.raises(ct.CompressedTensorsError, match=match):
        ct.load(str(d))


def test_load_rejects_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ct.CompressedTensorsError, match="config.json is missing"):
        ct.load(str(tmp_path))
    d = _copy(FIX24, tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ct.CompressedTensorsError, match="not a readable safetensors file"):
        ct.load(str(d))
    os.remove(d / "model.safetensors")
    with pytest.raises(ct.CompressedTensorsError, match="no model.safetensors"):
        ct.load(str(d))


# ------------------------------------------------------------------ the "dense" sparsity format
def test_load_dense_format_converts_the_targets(tmp_path):
    """llm-compressor's uncompressed sparse save: plain weights, sparsity_config format "dense"."""
    src, _ = ct.load(FIX24, convert=False)
    d = tmp_path / "dense"
    src.save_pretrained(str(d))
    sc = {"format": "dense", "sparsity_structure": "2:4", "targets": ["re:.*mlp\\.", "model.layers.0.self_attn.q_proj"],
          "ignore": ["re:.*down_proj$"], "global_sparsity": 0.4}
    _edit_config(d, lambda c: c.update(quantization_config={"quant_method": "compressed-tensors", "sparsity_config": sc,
                                                            "version": "0.12.2"}))
    m, info = ct.load(str(d))
    want = {f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj")}
    assert set(info.layers) == want | {"model.layers.0.self_attn.q_proj"}
    assert set(info.layers.values()) == {"2:4"}
    assert not isinstance(m.model.layers[0].mlp.down_proj, sk.SparseLinear)
    for name, digest in _expected(FIX24)["weight_sha256"].items():
        assert _sha(_weight(m.get_submodule(name))) == digest


def test_load_2of4_stored_as_bitmask_runs_as_2of4(tmp_path):
    """A "sparse-bitmask" checkpoint of 2:4 weights loads as 2:4 layers."""
    m, _ = ct.load(FIX24)
    d = tmp_path / "bm"
    assert ct.save(m, str(d), format=ct.FORMAT_BITMASK)["sparsity_structure"] == "2:4"
    m2, info = ct.load(str(d))
    assert set(info.layers.values()) == {"2:4"}
    # the structure is read off each layer's bitmask, whatever the config says
    _edit_config(d, lambda c: c["quantization_config"]["sparsity_config"].update(sparsity_structure="unstructured"))
    m3, info = ct.load(str(d))
    assert set(info.layers.values()) == {"2:4"}
    for name in info.layers:  # -0.0 is not stored by the bitmask format: equal values, not equal bits
        w = _weight(m.get_submodule(name))
        assert torch.equal(_weight(m2.get_submodule(name)), w) and torch.equal(_weight(m3.get_submodule(name)), w)


# ------------------------------------------------------------------ writing
def _tiny_llama(tie=True):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=144, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _pruned(sparsity, convert, permute=False):
    m = _tiny_llama()
    calib = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    sk.prune(m, method="wanda", sparsity=sparsity, calibration=calib, convert=convert, permute=permute,
             progress=False)
    return m


@pytest.mark.parametrize("case", ["2of4", "unstructured", "permuted"])
def test_save_then_load_round_trip(tmp_path, case):
    m = {"2of4": lambda: _pruned("2:4", True), "unstructured": lambda: _pruned(0.6, "bitmask"),
         "permuted": lambda: _pruned("2:4", True, permute=True)}[case]()
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    ref = _logits(m, ids)
    d = str(tmp_path / case)
    sc = ct.save(m, d)
    assert sc["format"] == (ct.FORMAT_24 if case == "2of4" else ct.FORMAT_BITMASK)
    sparse = {n: mod for n, mod in m.named_modules() if isinstance(mod, sk.SparseLinear)}
    assert sorted(sc["targets"]) == sorted(sparse) and len(sparse) == 14
    qc = json.loads(open(os.path.join(d, "config.json")).read())["quantization_config"]
    assert set(qc) == {"quant_method", "sparsity_config", "transform_config", "version"}
    m2, info = ct.load(d)
    for name, mod in sparse.items():
        assert_bitexact(_weight(m2.get_submodule(name)), mod.dense_weight(), name)
    assert m2.lm_head.weight is m2.model.embed_tokens.weight  # tied embeddings stored once, tied again
    if case == "permuted":  # stored unpermuted as bitmask layers: same function, another kernel
        torch.testing.assert_close(_logits(m2, ids), ref, atol=1e-5, rtol=1e-5)
    else:  # the same layers, weights and kernels: the same logits
        assert_bitexact(_logits(m2, ids), ref, "logits after a round trip")


@pytest.mark.parametrize("case", ["2of4", "unstructured"])
def test_library_reads_what_we_save(tmp_path, case):
    """compressed-tensors' own decompression of our checkpoint: every tensor equals ours."""
    pytest.importorskip("compressed_tensors.compressors.sparse_compressors",
                        reason="needs compressed-tensors <= 0.12 (the releases with sparse compressors)")
    from compressed_tensors.compressors import ModelCompressor

    m = _pruned("2:4", True) if case == "2of4" else _pruned(0.6, "bitmask")
    d = str(tmp_path / case)
    ct.save(m, d)
    fresh = transformers.LlamaForCausalLM(m.config)
    ModelCompressor.from_pretrained(d).decompress(d, fresh)
    fresh.tie_weights()  # its decompress assigns new Parameters; transformers' loader re-ties them
    ours = {n: _weight(mod) for n, mod in m.named_modules() if isinstance(mod, sk.SparseLinear)}
    for k, v in fresh.state_dict().items():
        mod_name = k.rsplit(".", 1)[0]
        want = ours[mod_name] if mod_name in ours and k.endswith(".weight") else m.state_dict()[k]
        assert_bitexact(v, want, f"compressed-tensors' {k}")


def test_save_rejects_what_the_format_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="has no SparseLinear layers"):
        ct.save(_tiny_llama(), str(tmp_path / "a"))
    m = _pruned("2:4", True, permute=True)
    with pytest.raises(ValueError, match="cannot hold layer .* input-channel permutation"):
        ct.save(m, str(tmp_path / "b"), format=ct.FORMAT_24)
    with pytest.raises(ValueError, match="format: got 'csr'"):
        ct.save(m, str(tmp_path / "c"), format="csr")
    with pytest.raises(TypeError, match="expected a Hugging Face model"):
        ct.save(nn.Sequential(sk.SparseLinear.from_dense(nn.Linear(16, 8))), str(tmp_path / "d"))
    g = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=1, n_head=4,
                                                             n_positions=32))
    sk.prune(g, method="magnitude", sparsity="2:4", convert=True, progress=False)
    with pytest.raises(ValueError, match="is a Conv1D with weight .* not an nn.Linear"):
        ct.save(g, str(tmp_path / "e"))
    assert not os.path.exists(tmp_path / "e" / "config.json")


def test_cli_prune_to_compressed_tensors_then_eval(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    d = tmp_path / "tiny"
    text = save_word_model_dir(d, _tiny_llama())
    out = tmp_path / "ct"
    assert cli.main(["prune", "--model", str(d), "--method", "wanda", "--pattern", "2:4", "--format",
                     "compressed-tensors", "--nsamples", "4", "--seqlen", "32", "--calibration-source", str(text),
                     "-o", str(out), "--no-progress"]) == 0
    o = capsys.readouterr().out
    assert "pruned and saved (compressed-tensors)" in o and ct.FORMAT_24 in o
    assert (out / "tokenizer.json").is_file() and ct.is_compressed_tensors(str(out))
    assert cli.main(["eval", "--model", str(out), "--eval-source", str(text), "--tokens", "200", "--window", "64",
                     "--no-progress"]) == 0
    assert "ppl" in capsys.readouterr().out
    # --int4: the 2:4 layers rounded to int4 after loading (in_features 64 and 144: groups of 16 divide both)
    assert cli.main(["eval", "--model", str(out), "--eval-source", str(text), "--tokens", "200", "--window", "64",
                     "--no-progress", "--int4", "16"]) == 0
    o = capsys.readouterr().out
    assert "int4: 14 2:4 layers rounded to int4 in groups of 16" in o and "ppl" in o
    with pytest.raises(SystemExit, match="--int4: group_size: got 24"):
        cli.main(["eval", "--model", str(out), "--eval-source", str(text), "--tokens", "200", "--no-progress",
                  "--int4", "24"])
    # prune --int4: SparseGPT with joint int4, saved pack-quantized; eval --keep-int4 runs it as int4
    out4 = tmp_path / "ct-int4"
    assert cli.main(["prune", "--model", str(d), "--method", "sparsegpt", "--pattern", "2:4", "--int4", "16",
                     "--format", "compressed-tensors", "--nsamples", "4", "--seqlen", "32", "--calibration-source",
                     str(text), "-o", str(out4), "--no-progress"]) == 0
    capsys.readouterr()
    m4, info4 = ct.load(str(out4), int4="keep")
    assert set(info4.layers.values()) == {"2:4 int4"} and info4.quantization["schemes"]["group_0"]["weights"] == \
        "int4 per group 16"
    assert cli.main(["eval", "--model", str(out4), "--eval-source", str(text), "--tokens", "200", "--window", "64",
                     "--no-progress", "--keep-int4"]) == 0
    assert "ppl" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--int4 takes none of --finetune-steps, --owl, --dsnot"):
        cli.main(["prune", "--model", str(d), "--int4", "16", "--finetune-steps", "2", "-o", str(tmp_path / "z4"),
                  "--no-progress"])
    with pytest.raises(SystemExit, match="compressed-tensors cannot store a permuted int4 layer"):
        cli.main(["prune", "--model", str(d), "--int4", "16", "--permute", "--format", "compressed-tensors",
                  "-o", str(tmp_path / "z6"), "--no-progress"])
    with pytest.raises(SystemExit, match="--int4 48: the group size must be 16, 32, 64 or 128"):
        cli.main(["prune", "--model", str(d), "--int4", "48", "--format", "compressed-tensors",
                  "-o", str(tmp_path / "z7"), "--no-progress"])
    with pytest.raises(SystemExit, match="--int4 quantizes inside SparseGPT's 2:4 column loop; got --method wanda"):
        cli.main(["prune", "--model", str(d), "--method", "wanda", "--int4", "16", "--format", "compressed-tensors",
                  "-o", str(tmp_path / "z5"), "--no-progress"])
    out2 = tmp_path / "ct-perm"
    assert cli.main(["prune", "--model", str(d), "--method", "wanda", "--pattern", "2:4", "--permute",
                     "--permute-rounds", "2", "--format", "compressed-tensors", "--nsamples", "4", "--seqlen", "32",
                     "--calibration-source", str(text), "-o", str(out2), "--no-progress"]) == 0
    o = capsys.readouterr().out
    assert "note: permuted layers are 2:4 only in their permuted column order" in o and ct.FORMAT_BITMASK in o
    # down_proj's permutation is folded into gate/up: it is plain 2:4 and loads as such
    assert set(ct.load(str(out2))[1].layers.values()) == {"bitmask", "2:4"}
    with pytest.raises(SystemExit, match="already a pruned \\(compressed-tensors\\) checkpoint"):
        cli.main(["prune", "--model", str(out), "--pattern", "2:4", "-o", str(tmp_path / "x"), "--no-progress"])
    with pytest.raises(SystemExit, match="--method structured saves a smaller dense model"):
        cli.main(["prune", "--model", str(d), "--method", "structured", "--sparsity", "0.5", "--format",
                  "compressed-tensors", "-o", str(tmp_path / "y"), "--no-progress"])


def test_cli_convert_both_ways(tmp_path, capsys):
    from sparse_kernels.llm import checkpoint

    ours, back = tmp_path / "ours", tmp_path / "back"
    assert cli.main(["convert", "--model", FIX24, "--format", "sparse_kernels", "-o", str(ours)]) == 0
    assert "to sparse_kernels.pruned_lm checkpoint" in capsys.readouterr().out
    m, cfg = checkpoint.load(str(ours))
    assert len(cfg["layers"]) == 14
    assert cli.main(["convert", "--model", str(ours), "--format", "compressed-tensors", "-o", str(back)]) == 0
    assert "to sparse-24-bitmask" in capsys.readouterr().out
    m2, info = ct.load(str(back))
    for name, digest in _expected(FIX24)["weight_sha256"].items():
        assert _sha(_weight(m.get_submodule(name))) == digest and _sha(_weight(m2.get_submodule(name))) == digest
    assert cli.main(["convert", "--model", FIXBM, "--format", "compressed-tensors", "--dtype", "fp32", "-o",
                     str(tmp_path / "bm32")]) == 0
    m3, info = ct.load(str(tmp_path / "bm32"))
    assert info.sparsity_config["format"] == ct.FORMAT_BITMASK and m3.model.embed_tokens.weight.dtype == torch.float32
    dense = tmp_path / "dense"
    _tiny_llama().save_pretrained(dense)
    with pytest.raises(SystemExit, match="is a dense model \\(hf\\), not a pruned checkpoint"):
        cli.main(["convert", "--model", str(dense), "--format", "compressed-tensors", "-o", str(tmp_path / "z")])


def test_save_over_an_existing_checkpoint(tmp_path):
    """An older checkpoint in the directory (sharded dense, or one of ours) is not read instead."""
    from sparse_kernels.llm import checkpoint

    d = tmp_path / "out"
    dense = _tiny_llama()
    dense.save_pretrained(str(d), max_shard_size="20KB")
    assert (d / "model.safetensors.index.json").is_file()
    ours = _pruned("2:4", True)
    checkpoint.save(_pruned("2:4", True), str(d))  # and one of ours on top
    ids = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(3))
    ct.save(ours, str(d))
    assert not (d / "model.safetensors.index.json").exists() and not (d / checkpoint.CONFIG_NAME).exists()
    assert not any(f.name.startswith("model-0") for f in d.iterdir())
    assert models.resolve(str(d)).kind == "compressed-tensors"
    m, info = ct.load(str(d))
    assert len(info.layers) == 14
    assert_bitexact(_logits(m, ids), _logits(ours, ids), "the model just saved")


def test_which_directories_are_claimed(tmp_path):
    """Sparse checkpoints, unquantized or with weights load() dequantizes, are ours; marlin-24, FP4
    and dense (no sparsity_config) compressed-tensors models are left to transformers."""
    assert ct.is_compressed_tensors(FIX24) and ct.is_compressed_tensors(FIXFP8)
    assert models.resolve(FIXFP8).kind == "compressed-tensors"
    assert ct.is_compressed_tensors(FIXMARLIN)
    for fmt, match in (("marlin-24", "marlin-24 holds symmetric int4/int8"),  # FP8 weights cannot be
                       ("nvfp4-pack-quantized", "quantization format 'nvfp4-pack-quantized'")):
        d = _copy(FIXFP8, tmp_path, fmt)
        _edit_config(d, lambda c: c["quantization_config"].update(format=fmt) or
                     c["quantization_config"]["config_groups"]["group_0"].update(format=fmt))
        assert not ct.is_compressed_tensors(str(d)) and models.resolve(str(d)).kind == "hf"
        with pytest.raises(ct.CompressedTensorsError, match=match):
            ct.load(str(d))
    d = _copy(FIX24, tmp_path)
    _edit_config(d, lambda c: c["quantization_config"].update(config_groups=None, format=None, sparsity_config={}))
    assert not ct.is_compressed_tensors(str(d))


def test_save_formats_structure_and_dtype(tmp_path):
    # a 2:4 layer whose in_features is not a multiple of 4: "auto" stores the model as sparse-bitmask
    m = _tiny_llama()
    mlp = m.model.layers[0].mlp
    mlp.down_proj = sk.SparseLinear.from_dense(nn.Linear(144, 64, bias=False), pattern="2:4")
    assert ct.save(m, str(tmp_path / "a"))["format"] == ct.FORMAT_24
    lin = nn.Linear(70, 64, bias=False)
    m2 = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=70, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))
    m2.model.layers[0].mlp.down_proj = sk.SparseLinear.from_dense(lin, pattern="2:4")
    sc = ct.save(m2, str(tmp_path / "b"))
    assert sc["format"] == ct.FORMAT_BITMASK and sc["sparsity_structure"] == "unstructured"
    with pytest.raises(ValueError, match="has 70 input features"):
        ct.save(m2, str(tmp_path / "c"), format=ct.FORMAT_24)
    # all 2:4, stored as sparse-bitmask: the structure is recorded, and it loads as 2:4
    sc = ct.save(_pruned("2:4", True), str(tmp_path / "d"), format=ct.FORMAT_BITMASK)
    assert sc["sparsity_structure"] == "2:4"
    assert set(ct.load(str(tmp_path / "d"))[1].layers.values()) == {"2:4"}
    # the config names the stored dtype
    m3, _ = ct.load(FIXBM, dtype=torch.float32)
    ct.save(m3, str(tmp_path / "e"))
    assert json.loads((tmp_path / "e" / "config.json").read_text())["dtype"] == "float32"
    assert ct.load(str(tmp_path / "e"))[0].model.embed_tokens.weight.dtype == torch.float32


def test_dense_format_keeps_dense_targets_dense(tmp_path):
    src = _tiny_llama()
    with torch.no_grad():  # one layer 70% sparse, the rest dense
        w = src.model.layers[0].mlp.up_proj.weight
        w.mul_(torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) > 0.7)
    d = tmp_path / "dense"
    src.save_pretrained(str(d))
    _edit_config(d, lambda c: c.update(quantization_config={
        "quant_method": "compressed-tensors", "sparsity_config": {"format": "dense", "targets": ["Linear"],
                                                                  "ignore": ["lm_head"]}}))
    m, info = ct.load(str(d))
    assert info.layers == {"model.layers.0.mlp.up_proj": "bitmask"}


def test_load_model_needs_a_tokenizer():
    with pytest.raises(FileNotFoundError, match="without tokenizer files"):
        models.load_model(FIX24)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compressed_tensors_load_on_cuda():
    exp = _expected(FIX24)
    m, info = ct.load(FIX24, device="cuda")
    assert m.model.layers[0].mlp.down_proj.values.device.type == "cuda"
    ids = torch.tensor(exp["input_ids"])
    exact = _logits(ct.load(FIX24, convert=False)[0].double(), ids)
    lowp = _logits(ct.load(FIX24, convert=False)[0], ids)
    with torch.no_grad():
        got = m(input_ids=ids.cuda(), use_cache=False).logits.float().cpu()
    assert_matmul_close(got, exact, lowp, "logits on CUDA", factor=4.0)


def test_load_legacy_compression_config(tmp_path):
    """compressed-tensors up to 0.4 (the sparseml era) wrote the section as ``compression_config``
    (quantization fields plus ``sparsity_config``, no quant_method)."""
    d = _copy(FIXBM, tmp_path)

    def legacy(c):
        qc = c.pop("quantization_config")
        c["compression_config"] = {"sparsity_config": qc["sparsity_config"]}

    _edit_config(d, legacy)
    assert ct.is_compressed_tensors(str(d)) and models.resolve(str(d)).kind == "compressed-tensors"
    m, info = ct.load(str(d))
    assert set(info.layers.values()) == {"bitmask"} and len(info.layers) == 14
    for name, digest in _expected(FIXBM)["weight_sha256"].items():
        assert _sha(_weight(m.get_submodule(name))) == digest
    out = tmp_path / "resaved"
    ct.save(m, str(out))
    cfg = json.loads((out / "config.json").read_text())
    assert "compression_config" not in cfg and cfg["quantization_config"]["quant_method"] == ct.QUANT_METHOD


# ------------------------------------------------------------------ quantized sparse checkpoints
@pytest.mark.parametrize("path, pattern, weights, acts", [
    (FIXFP8, "2:4", "float8 per channel", "float8 dynamic per token"),
    (FIXINT8, "2:4", "int8 per channel", "int8 dynamic per token"),
    (FIXW4, "2:4", "int4 per group 8", None),
    (FIXFP8BLK, "bitmask", "float8 per block 8x8", None),
    (FIXASYM, "bitmask", "int8 per tensor", None),
    (FIXMARLIN, "2:4", "int4 per group 128", None),
    (FIXMARLIN8, "2:4", "int8 per channel", None),
], ids=["fp8-channel-2of4", "int8-channel-2of4", "w4a16-actorder-2of4", "fp8-block-unstructured", "int8-asym",
        "w4a16-marlin24", "w8a16-channel-marlin24"])
def test_load_quantized_checkpoint_dequantizes_exactly(path, pattern, weights, acts):
    """Every weight equals, bit for bit, what compressed-tensors 0.12.2 itself dequantizes (the
    fixture's hashes), and the sparse layers run on our kernels."""
    exp = _expected(path)
    m, info = ct.load(path)
    q = info.quantization
    assert q["schemes"]["group_0"]["weights"] == weights and q["dequantized_layers"] == 14
    assert q["dequantized_to"] == exp["dtype"] == exp["weight_dtypes"][0]
    assert q["not_applied"] == ([f"group_0 input activations: {acts}"] if acts else [])
    assert set(info.layers.values()) == {pattern} and len(info.layers) == 14
    for name, digest in exp["weight_sha256"].items():
        mod = m.get_submodule(name)
        assert isinstance(mod, sk.SparseLinear) and mod.pattern == pattern, name
        assert _sha(_weight(mod)) == digest, f"{name}: differs from compressed-tensors' dequantization"
    assert isinstance(m.lm_head, nn.Linear) and m.lm_head.weight.dtype == getattr(torch, exp["dtype"])
    ids = torch.tensor(exp["input_ids"])
    dense, dinfo = ct.load(path, convert=False)
    assert not dinfo.layers and dinfo.quantization == q
    torch.testing.assert_close(_logits(dense, ids), torch.tensor(exp["logits"]), atol=2e-4, rtol=0)
    lowp = _logits(dense, ids)
    exact = _logits(dense.double(), ids)  # .double() converts in place
    for backend in ("reference", "cpp"):
        for mod in m.modules():
            if isinstance(mod, sk.SparseLinear):
                mod.backend = backend
                mod.refresh_cache()
        assert_matmul_close(_logits(m, ids), exact, lowp, f"logits ({backend})")


def test_load_quantized_pruned_weights_stay_zero():
    """Asymmetric INT8: a pruned weight is stored as the zero point (so the library's bitmask marks
    everything) and dequantizes to exactly 0, so the layer is as sparse as it was pruned."""
    t = load_file(os.path.join(FIXASYM, "model.safetensors"))
    name = "model.layers.0.mlp.gate_proj"
    marked = int(np.unpackbits(t[name + ".bitmask"].numpy(), axis=-1, bitorder="little")[:, :32].sum())
    assert marked > 0.95 * 72 * 32 and name + ".weight_zero_point" in t  # nearly every element stored
    m, _ = ct.load(FIXASYM)
    w = m.get_submodule(name).dense_weight()
    assert 0.4 < float((w == 0).float().mean()) < 0.6


def test_load_quantized_drops_activation_scales_and_follows_the_model_dtype(tmp_path):
    d = _copy(FIXINT8, tmp_path)
    q = "model.layers.0.self_attn.q_proj"

    def edit(t):
        t[q + ".input_scale"] = torch.tensor([0.05], dtype=torch.float16)
        t["model.layers.1.self_attn.k_scale"] = torch.tensor(1.0)
        t[q + ".weight_scale"] = t[q + ".weight_scale"].float() * 1.001  # float32 scales in a float16 model
    _edit_tensors(d, edit)
    m, info = ct.load(str(d))
    assert info.quantization["not_applied"][-1] == "2 activation / KV-cache scale tensors dropped"
    assert info.quantization["dequantized_to"] == "float16" and info.quantization["cast_from"] == ["float32"]
    assert "dequantized to float16 (computed in float32, then cast)" in ct.quantization_note(info.quantization)
    t = load_file(str(d / "model.safetensors"))
    codes = ct._quantized_from_parts(q, ct.FORMAT_24, {k: t[f"{q}.{k}"] for k in ("shape", "compressed", "bitmask")})
    want = (codes.float() * t[q + ".weight_scale"]).half()  # in the scale's dtype, then the model's
    assert_bitexact(_int_view(_weight(m.get_submodule(q))), _int_view(want), "float32-scaled layer")


def _w4_edit(key, fn):
    return lambda t: t.update({key: fn(t[key]).contiguous()})


Q0 = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("fixture, edit, match", [
    (FIXFP8, lambda t: t.pop(Q0 + ".weight_scale"), f"quantizes '{Q0}' \\(float-quantized\\) but {Q0}.weight_scale"),
    (FIXFP8, _w4_edit(Q0 + ".weight_scale", lambda s: s[:-1]),
     rf"{Q0}.weight_scale: channel quantization of a \[32, 32\] weight needs shape \[32, 1\], got \[31, 1\]"),
    (FIXFP8, _w4_edit(Q0 + ".compressed", lambda c: c.view(torch.int8).to(torch.float16)),
     rf"{Q0}.compressed: a quantized layer stores 1-byte codes"),
    (FIXFP8, _w4_edit(Q0 + ".compressed", lambda c: c.view(torch.int8)),
     rf"{Q0}.weight: float-quantized float8 weights are stored as 2-D float8_e4m3fn, got int8"),
    (FIXFP8, _w4_edit(Q0 + ".weight_scale", lambda s: s.to(torch.float8_e4m3fn)), "weight_scale: expected float16"),
    (FIXFP8, lambda t: t.update({"lm_head.weight_scale": torch.ones(64, 1, dtype=torch.bfloat16)}),
     "lm_head.weight_scale is stored but no config group quantizes the weight of 'lm_head'"),
    (FIXFP8, lambda t: t.update({"model.bogus.weight_scale": torch.ones(1)}), "'model.bogus' is not a module"),
    (FIXW4, _w4_edit(Q0 + ".weight_packed", lambda p: p[:, :-1]),
     rf"{Q0}.weight_packed: expected int32\[32, 4\] \(4-bit codes in 32 rows of 32\), got int32\[32, 3\]"),
    # unbalanced activation order: the library would cut the sorted columns into other groups
    (FIXW4, _w4_edit(Q0 + ".weight_g_idx", lambda g: torch.where(g == 3, torch.zeros_like(g), g)),
     rf"{Q0}.weight_g_idx: every group must hold exactly group_size=8 columns"),
    (FIXMARLIN, lambda t: t.update({Q0 + ".weight_scale": torch.ones(128, 1, dtype=torch.float16)}),
     f"'{Q0}' is stored as marlin-24, which has no {Q0}.weight_scale"),
    (FIXW4, _w4_edit(Q0 + ".weight_g_idx", lambda g: g + 1), rf"{Q0}.weight_g_idx: group indices must lie in \[0, 4\)"),
    (FIXW4, lambda t: t.pop(Q0 + ".weight_shape"), "weight_packed / .*weight_shape is missing"),
    (FIXFP8BLK, _w4_edit(Q0 + ".weight_scale", lambda s: s[:, :2]), r"needs shape \[4, 4\], got \[4, 2\]"),
    (FIXMARLIN, lambda t: t.pop(Q0 + ".meta"), f"stores '{Q0}' as marlin-24 but {Q0}.meta is missing"),
    (FIXMARLIN, _w4_edit(Q0 + ".meta", lambda m: m.int()), rf"{Q0}.meta: expected int16 with 1024 elements"),
    (FIXMARLIN, _w4_edit(Q0 + ".meta", lambda m: m | 0x000F), rf"{Q0}.meta: .*meta"),
    (FIXMARLIN, _w4_edit(Q0 + ".scale_packed", lambda s: s.float()),
     rf"{Q0}.scale_packed: expected float16\[1, 128\], got float32\[1, 128\]"),
    (FIXMARLIN, _w4_edit(Q0 + ".weight_packed", lambda p: p[:, :-8]),
     rf"{Q0}.weight_packed: expected int32\[4, 256\]"),
])
def test_load_quantized_rejects_corrupt_tensors(tmp_path, fixture, edit, match):
    d = _copy(fixture, tmp_path)
    _edit_tensors(d, edit)
    with pytest.raises(ct.CompressedTensorsError, match=match):
        ct.load(str(d))


@pytest.mark.parametrize("edit, match", [
    (lambda g: g["weights"].update(dynamic=True), "weights.dynamic is set"),
    (lambda g: g["weights"].update(type="float", num_bits=4), "weights of type 'float' with 4 bits"),
    (lambda g: g["weights"].update(strategy="tensor_group"), "weight strategy 'tensor_group' is not supported"),
    (lambda g: g["weights"].update(strategy="block", block_structure=[8]), "needs block_structure"),
    (lambda g: g["weights"].update(strategy="group", group_size=None), "needs a positive group_size"),
    (lambda g: g.update(targets="Linear"), "targets must be a list of strings"),
    (lambda g: g["weights"].update(block_structure="8y8", strategy="block"), "block_structure '8y8' is not ROWSxCOLS"),
])
def test_load_quantized_rejects_configs(tmp_path, edit, match):
    d = _copy(FIXFP8, tmp_path)
    _edit_config(d, lambda c: edit(c["quantization_config"]["config_groups"]["group_0"]))
    with pytest.raises(ct.CompressedTensorsError, match=match):
        ct.load(str(d))
    assert not ct.is_compressed_tensors(str(d))


def test_cli_convert_quantized_to_sparse_kernels(tmp_path, capsys):
    """An FP8 2:4 checkpoint becomes one of ours (bfloat16 2:4, dequantized) and back."""
    from sparse_kernels.llm import checkpoint

    ours, back = tmp_path / "ours", tmp_path / "back"
    assert cli.main(["convert", "--model", FIXFP8, "--format", "sparse_kernels", "-o", str(ours)]) == 0
    assert ("float-quantized weights: 14 layers dequantized to bfloat16 on load; "
            "not applied: group_0 input activations: float8 dynamic per token") in capsys.readouterr().out
    m, cfg = checkpoint.load(str(ours))
    assert cli.main(["convert", "--model", str(ours), "--format", "compressed-tensors", "-o", str(back)]) == 0
    m2, info = ct.load(str(back))
    assert info.quantization is None and set(info.layers.values()) == {"2:4"}
    for name, digest in _expected(FIXFP8)["weight_sha256"].items():
        assert _sha(_weight(m.get_submodule(name))) == digest and _sha(_weight(m2.get_submodule(name))) == digest


def test_load_quantization_format_dense_keeps_the_stored_weights(tmp_path):
    """format "dense": fake-quantized weights stored as floats, with their scales beside them."""
    d = _copy(FIX24, tmp_path)
    _edit_config(d, lambda c: c["quantization_config"].update(format="dense", ignore=["lm_head"], config_groups={
        "group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}}))
    _edit_tensors(d, lambda t: t.update({f"{n}.weight_scale": torch.full((int(t[n + ".shape"][0]), 1), 2.0)
                                         for n in [k[:-6] for k in t if k.endswith(".shape")]}))  # not applied
    m, info = ct.load(str(d))
    assert info.quantization["stored_unquantized_layers"] == 14 and info.quantization["dequantized_layers"] == 0
    assert set(info.layers.values()) == {"2:4"}
    for name, digest in _expected(FIX24)["weight_sha256"].items():
        assert _sha(_weight(m.get_submodule(name))) == digest


@pytest.mark.parametrize("edit, match", [
    (lambda q: q.update(config_groups=[1]), "config_groups must be a JSON object, got list"),
    (lambda q: q.update(ignore=[1]), r"ignore must be a list of strings, got \[1\]"),
    (lambda q: q.update(ignore="lm_head"), "ignore must be a list of strings, got 'lm_head'"),
    (lambda q: q["config_groups"]["group_0"].update(format="pack-quantized") or q["config_groups"]["group_0"][
        "weights"].update(type="int", symmetric=False), "asymmetric pack-quantized weights per channel"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(symmetric=False),
     "weight_zero_point is missing; config group 'group_0' is asymmetric"),
])
def test_load_quantized_rejects_malformed_sections(tmp_path, edit, match):
    d = _copy(FIXFP8, tmp_path)
    _edit_config(d, lambda c: edit(c["quantization_config"]))
    with pytest.raises(ct.CompressedTensorsError, match=match):
        ct.load(str(d))


def test_load_quantized_config_forms_the_library_accepts(tmp_path):
    """QuantizationArgs' normalisations: no strategy + group_size -1 is channel, names in any case."""
    d = _copy(FIXFP8, tmp_path)
    _edit_config(d, lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].update(
        strategy=None, group_size=-1, type="FLOAT"))
    m, info = ct.load(str(d))
    assert info.quantization["schemes"]["group_0"]["weights"] == "float8 per channel"
    for name, digest in _expected(FIXFP8)["weight_sha256"].items():
        assert _sha(_weight(m.get_submodule(name))) == digest


def test_load_quantized_scheme_precedence(tmp_path):
    """A name or re: target outranks a class-name target of an earlier group, as in
    compressed-tensors (match_targets); an activation-only group quantizes no weight."""
    d = _copy(FIXFP8, tmp_path)
    g0 = json.loads((d / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]

    def edit(c):
        c["quantization_config"]["config_groups"] = {
            "group_0": g0,
            "group_1": {"targets": ["re:.*q_proj$"], "input_activations": g0["input_activations"]},
        }
    _edit_config(d, edit)
    # q_proj now belongs to the activation-only group: its stored weight_scale is an error ...
    with pytest.raises(ct.CompressedTensorsError, match="q_proj.weight_scale is stored but no config group quantizes"):
        ct.load(str(d))
    # ... and with the re: group quantizing weights the same way, everything loads as before
    _edit_config(d, lambda c: c["quantization_config"]["config_groups"]["group_1"].update(weights=g0["weights"]))
    m, info = ct.load(str(d))
    for name, digest in _expected(FIXFP8)["weight_sha256"].items():
        assert _sha(_weight(m.get_submodule(name))) == digest


@pytest.mark.parametrize("path, kept", [(FIXMARLIN, True), (FIXMARLIN8, False), (FIXW4, False), (FIXFP8, False)],
                         ids=["marlin24-int4", "marlin24-int8", "w4a16-actorder-groups-of-8", "fp8"])
def test_load_int4_keep(path, kept):
    """int4="keep": symmetric int4 2:4 layers stay int4 (SparseLinearInt4, codes and scales as
    stored); the others (int8, activation-ordered groups of 8, FP8) are dequantized as before."""
    exp = _expected(path)
    m, info = ct.load(path, int4="keep")
    assert info.quantization["int4_layers"] == (14 if kept else 0)
    assert set(info.layers.values()) == ({"2:4 int4"} if kept else {"2:4"})
    ids = torch.tensor(exp["input_ids"])
    dense, _ = ct.load(path, convert=False)
    lowp = _logits(dense, ids)
    for name in exp["weight_sha256"]:
        mod = m.get_submodule(name)
        assert isinstance(mod, sk.SparseLinearInt4) == kept
        if kept:  # exact q * scale, against the library's float16 rounding of it: within half an ulp
            w16 = dense.get_submodule(name).weight.detach()
            w = mod.dense_weight(torch.float32)
            assert_bitexact(w.to(torch.float16), w16, f"{name}: rounds to the dequantized weight")
            n = w16.numel()  # codes n/4 bytes, meta n/8, float16 scales: 3 bits a weight against 9 for 16-bit 2:4
            assert mod.nbytes() == n // 4 + n // 8 + 2 * mod.scales.numel() < n * 9 // 8 // 2
    exact = _logits(dense.double(), ids)
    assert_matmul_close(_logits(m, ids), exact, lowp, "int4 model logits", factor=3.0)
    with pytest.raises(ValueError, match="int4: got 'yes'"):
        ct.load(path, int4="yes")


def test_int4_layers_save_as_pack_quantized_and_convert_to_ours(tmp_path):
    """A marlin-24 model kept int4 is rewritten pack-quantized with the same codes and scales, and
    our own format (2:4-int4 layers) stores the same layers bit for bit."""
    from sparse_kernels.llm import checkpoint

    m, _ = ct.load(FIXMARLIN, int4="keep")
    ct.save(m, str(tmp_path / "a"))
    back, info = ct.load(str(tmp_path / "a"), int4="keep")
    assert set(info.layers.values()) == {"2:4 int4"}
    cfg = checkpoint.save(m, str(tmp_path / "b"))
    ours, _ = checkpoint.load(str(tmp_path / "b"))
    assert cfg["format_version"] == 4 and {li["format"] for li in cfg["layers"].values()} == {"2:4-int4"}
    n = 0
    for name, mod in m.named_modules():
        if isinstance(mod, sk.SparseLinearInt4):  # (a group with one nonzero code may keep other positions)
            assert_bitexact(back.get_submodule(name).dense_weight(torch.float32), mod.dense_weight(torch.float32), name)
            assert_bitexact(back.get_submodule(name).scales, mod.scales, name)
            o = ours.get_submodule(name)
            assert isinstance(o, sk.SparseLinearInt4) and o.group_size == mod.group_size
            for buf in ("qvalues", "meta", "scales"):
                assert_bitexact(getattr(o, buf), getattr(mod, buf), f"{name}.{buf}")
            n += 1
    assert n > 0


def test_load_int4_keep_keeps_scales_under_dtype():
    m, info = ct.load(FIXMARLIN, int4="keep", dtype=torch.bfloat16)
    q = m.model.layers[0].self_attn.q_proj
    assert isinstance(q, sk.SparseLinearInt4) and q.scales.dtype == torch.float16
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16
    ref_m, _ = ct.load(FIXMARLIN, int4="keep")
    assert_bitexact(q.scales, ref_m.model.layers[0].self_attn.q_proj.scales, "scales as stored")
    with pytest.raises(ValueError, match="int4: 'keep' builds SparseLinearInt4 layers; convert=False"):
        ct.load(FIXMARLIN, int4="keep", convert=False)


@pytest.mark.parametrize("permute", [False, True])
def test_save_int4_model_as_pack_quantized(tmp_path, permute):
    """SparseLinearInt4 layers are written as llm-compressor writes a 2:4 W4A16 model
    (pack-quantized, dense sparsity format); int4="keep" reads them back as they were.  Permuted
    ones are refused (compressed-tensors 0.13+ reads no activation-ordered groups) unless folded."""
    ids = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(1))
    m = _tiny_llama()
    sk.prune(m, "sparsegpt", "2:4", calibration=ids, int4=16, permute=permute, convert=True, progress=False)
    if permute:
        with pytest.raises(ValueError, match="int4 layer 'model.layers.0.self_attn.q_proj' has an input-channel "
                                             "permutation"):
            ct.save(m, str(tmp_path / "q"))
        assert not (tmp_path / "q").exists()
        return
    sc = ct.save(m, str(tmp_path / "q"))
    assert sc["format"] == ct.FORMAT_DENSE and sc["sparsity_structure"] == "2:4"
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized" and cfg["config_groups"]["group_0"]["weights"]["group_size"] == 16
    ids2 = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(2))
    keep, info = ct.load(str(tmp_path / "q"), int4="keep")
    deq, dinfo = ct.load(str(tmp_path / "q"))
    assert set(info.layers.values()) == {"2:4 int4"} and set(dinfo.layers.values()) == {"2:4"}
    torch.testing.assert_close(_logits(keep, ids2), _logits(m, ids2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(deq, ids2), _logits(m, ids2), atol=1e-5, rtol=1e-5)
    for name, mod in m.named_modules():
        if isinstance(mod, sk.SparseLinearInt4):
            k = keep.get_submodule(name)
            assert_bitexact(k.qvalues, mod.qvalues, name)
            assert_bitexact(k.scales, mod.scales, name)
    # a group size that does not divide a layer's in_features (padded layer): refused
    odd = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=72, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))
    odd.model.layers[0].mlp.down_proj = sk.SparseLinearInt4.from_dense(nn.Linear(72, 64, bias=False), 16)  # padded: 80
    with pytest.raises(ValueError, match="72 input features, not a multiple of its group size 16"):
        ct.save(odd, str(tmp_path / "odd"))
    mixed = _pruned("2:4", True)
    mixed.model.layers[0].mlp.up_proj = sk.SparseLinearInt4.from_sparse(mixed.model.layers[0].mlp.up_proj, 16)
    with pytest.raises(ValueError, match="mixes 2:4 int4 layers"):
        ct.save(mixed, str(tmp_path / "mixed"))


def _fixture_script():
    """tests/data/make_compressed_tensors_fixtures.py as a module (its library_decompress), after
    skipping unless a compressed-tensors with sparse compressors (<= 0.12) is importable."""
    pytest.importorskip("compressed_tensors.compressors.sparse_compressors")
    import importlib.util

    spec = importlib.util.spec_from_file_location("mk", os.path.join(DATA, os.pardir,
                                                                    "make_compressed_tensors_fixtures.py"))
    mk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mk)
    return mk


def test_library_reads_our_int4_checkpoint(tmp_path):
    """compressed-tensors <= 0.12 itself dequantizes what we write to our layers' exact weights
    (runs where such a compressed-tensors is importable)."""
    mk = _fixture_script()
    from sparse_kernels.llm import checkpoint

    ids = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(1))
    for per_channel in (False, True):  # groups of 16, or one scale per row
        m = _tiny_llama()
        sk.prune(m, "sparsegpt", "2:4", calibration=ids, int4=16, convert=True, progress=False)
        if per_channel:
            for n, mod in list(m.named_modules()):
                if isinstance(mod, sk.SparseLinearInt4):
                    checkpoint._replace(m, n, sk.SparseLinearInt4.from_sparse(mod.to_sparse(), None))
        d = tmp_path / f"channel{int(per_channel)}"
        ct.save(m, str(d))
        lib = checkpoint.model_from_config(ct.read_config(str(d))[0])
        mk.library_decompress(str(d), lib)
        for name, mod in m.named_modules():
            if isinstance(mod, sk.SparseLinearInt4):
                assert_bitexact(lib.get_submodule(name).weight.detach(), mod.dense_weight(), name)


# ------------------------------------------------------------------ input activations (emulated)
def _act(typ="int", strategy="token", symmetric=True, dynamic=True, bits=8):
    return ct.ActivationArgs.parse("g", dict(type=typ, num_bits=bits, strategy=strategy, symmetric=symmetric,
                                             dynamic=dynamic))


def test_fake_quantize_activation_by_hand():
    """int8 symmetric per token: scale = max|x| / 127.5 (the library's range / 2), codes rounded
    half to even and clamped to 127; each token (dims after the first two) has its own scale, a
    2-D input one scale for all (as compressed-tensors reduces)."""
    x = torch.tensor([[[1.0, -2.0, 4.0, 0.5], [0.25, 0.0, -0.5, 0.125]]])
    got = ct.fake_quantize_activation(x, _act())
    for t in range(2):
        xs = x[0, t].numpy()
        s = np.float32(np.abs(xs).max()) / np.float32(127.5)
        q = np.clip(np.round(xs / s), -128, 127).astype(np.float32)
        assert_bitexact(got[0, t], torch.from_numpy(q * s), f"token {t}")
    assert float(got[0, 0, 2]) == float(np.float32(127) * (np.float32(4.0) / np.float32(127.5)))  # clamped 127.5
    flat = ct.fake_quantize_activation(x[0], _act())  # 2-D: one scale over both rows
    s = np.float32(4.0) / np.float32(127.5)
    assert_bitexact(flat[1], torch.from_numpy(np.clip(np.round(x[0, 1].numpy() / s), -128, 127).astype(np.float32) * s),
                    "2-D input, the whole tensor's scale")
    # asymmetric: zero point = round(-128 - min / scale), the range [min(x, 0), max(x, 0)]
    a = ct.fake_quantize_activation(x, _act(symmetric=False))
    assert float((a - x).abs().max()) <= float((x.amax() - x.amin()) / 255) / 2 + 1e-6
    # FP8 per tensor: x / (max|x| / 448) rounded to float8_e4m3fn
    f = ct.fake_quantize_activation(x, _act("float", "tensor"))
    sf = torch.tensor(4.0) / 448.0
    assert_bitexact(f, (x / sf).to(torch.float8_e4m3fn).float() * sf, "fp8 per tensor")
    # static: the given scale (and zero point)
    st = ct.fake_quantize_activation(x, _act(dynamic=False, strategy="tensor"), torch.tensor([0.5]))
    assert_bitexact(st, torch.clamp(torch.round(x / 0.5), -128, 127) * 0.5, "static")


@pytest.mark.parametrize("a, msg", [
    (dict(type="float", num_bits=4, dynamic=True, strategy="token"), "float' with 4 bits cannot be emulated"),
    (dict(type="int", num_bits=8, dynamic=True, strategy="group", group_size=16), "cannot be emulated"),
    (dict(type="int", num_bits=8, dynamic="local", strategy="token"), "dynamic='local'"),
    (dict(type="int", num_bits=8, dynamic=False, strategy="token"), "static per tensor"),
    (dict(type="int", num_bits=8, dynamic=True, group_size=16), "per group"),  # no strategy: group, as the library
    (dict(type="int", num_bits=8, dynamic=True, group_size=-1), "per channel"),
])
def test_activation_args_refused(a, msg):
    with pytest.raises(ValueError, match=msg):
        ct.ActivationArgs.parse("g", a)


@pytest.mark.parametrize("fix", [FIXFP8, FIXINT8])
def test_load_emulates_input_activations(fix):
    """activations="emulate": every quantized layer gets a pre-hook, the LoadInfo says so, and
    the logits move (a random 2-layer model: by up to a few tens of percent; the exactness is
    test_emulated_activations_match_the_library_bit_for_bit's)."""
    plain, _ = ct.load(fix)
    emu, info = ct.load(fix, activations="emulate")
    q = info.quantization
    assert q["emulated"] == ["group_0 input activations: " + ("float8" if fix == FIXFP8 else "int8")
                             + " dynamic per token"]
    assert not any("input activations" in n for n in q["not_applied"])
    hooked = [n for n, mod in emu.named_modules()
              if any(isinstance(h, ct.ActivationQuantizer) for h in mod._forward_pre_hooks.values())]
    assert len(hooked) == 14 and all(".layers." in n for n in hooked)
    assert "emulated: group_0 input activations" in ct.quantization_note(q)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(3))
    a, b = _logits(plain, ids), _logits(emu, ids)
    rel = float((a - b).norm() / a.norm())
    assert 0 < rel < 0.5 and bool(torch.isfinite(b).all()), rel
    with pytest.raises(ValueError, match="activations: got 'on'"):
        ct.load(fix, activations="on")


def test_load_emulates_static_activations_and_needs_their_scales(tmp_path):
    """A static per-tensor config: the stored input_scale is used (cast to the layer's dtype);
    without it, a clear error."""
    d = shutil.copytree(FIXINT8, tmp_path / "static")
    cfg = json.loads((d / "config.json").read_text())
    ia = cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"]
    ia.update(dynamic=False, strategy="tensor")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ct.CompressedTensorsError, match="static input activations need one floating-point .*input_scale"):
        ct.load(str(d), activations="emulate")
    t = load_file(str(d / "model.safetensors"))
    names = sorted({k.rsplit(".", 1)[0] for k in t if k.endswith(".weight_scale")})
    for n in names:
        t[n + ".input_scale"] = torch.tensor([0.05], dtype=torch.float32)
    save_file(t, str(d / "model.safetensors"))
    m, info = ct.load(str(d), activations="emulate")
    mod = m.get_submodule(names[0])
    hook = next(h for h in mod._forward_pre_hooks.values() if isinstance(h, ct.ActivationQuantizer))
    assert hook.scale.dtype == torch.float16 and float(hook.scale) == float(torch.tensor(0.05).half())
    x = torch.randn(1, 3, mod.in_features, dtype=torch.float16)
    assert_bitexact(hook(mod, (x,))[0], torch.clamp(torch.round(x / hook.scale), -128, 127) * hook.scale, "static")
    m = m.to(torch.bfloat16)  # the scale follows the layer, as the library's input_scale parameter does
    y = m(input_ids=torch.randint(0, 64, (1, 8))).logits
    assert hook.scale.dtype == torch.bfloat16 and y.dtype == torch.bfloat16


def test_emulated_activations_match_the_library_bit_for_bit():
    """Dense layers (convert=False) with emulated input activations against compressed-tensors'
    own model with its activation quantization on: the same logits, bit for bit (runs where a
    compressed-tensors <= 0.12 is importable)."""
    mk = _fixture_script()
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    from sparse_kernels.llm import checkpoint

    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(4))
    for fix in (FIXFP8, FIXINT8):
        ours, _ = ct.load(fix, convert=False, activations="emulate")
        lib = checkpoint.model_from_config(ct.read_config(fix)[0])
        mk.library_decompress(fix, lib)
        lib = checkpoint._to_dtype(lib, next(ours.parameters()).dtype)
        assert_bitexact(_logits(ours, ids), _logits(lib, ids), fix)
    # every emulated kind against the library's forward_quantize on its own
    g = torch.Generator().manual_seed(5)
    for typ, strategy, sym, dyn in [("float", "token", True, True), ("float", "tensor", True, True),
                                    ("int", "token", False, True), ("int", "tensor", False, True),
                                    ("int", "tensor", True, False), ("int", "tensor", False, False),
                                    ("float", "tensor", True, False)]:
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            a = dict(type=typ, num_bits=8, strategy=strategy, symmetric=sym, dynamic=dyn)
            lin = nn.Linear(64, 4, dtype=dt)
            lin.quantization_status = "frozen"
            scale = zp = None
            if not dyn:
                scale = torch.tensor([0.03], dtype=dt)
                lin.input_scale = nn.Parameter(scale, requires_grad=False)
                if not sym:
                    zp = torch.tensor([-5], dtype=torch.int8) if typ == "int" else None
                    lin.input_zero_point = nn.Parameter(zp, requires_grad=False)
            x = (torch.randn(2, 5, 64, generator=g) * torch.exp(torch.randn(64, generator=g))).to(dt)
            want = forward_quantize(lin, x, "input", QuantizationArgs(**a))
            got = ct.fake_quantize_activation(x, ct.ActivationArgs.parse("g", a), scale, zp)
            assert_bitexact(got, want, f"{a} {dt}")


def test_cli_emulate_activations_reaches_the_loader(tmp_path, monkeypatch):
    """eval/bench --emulate-activations -> models.load_model(activations="emulate") ->
    compressed_tensors.load(activations="emulate"); without the flag, "ignore"."""
    seen = []

    class Stop(Exception):
        pass

    def fake_ct_load(path, **kw):
        seen.append(kw["activations"])
        raise Stop

    d = shutil.copytree(FIXINT8, tmp_path / "w8a8")
    (d / "tokenizer.json").write_text("{}")  # the loader checks that a tokenizer is there first
    monkeypatch.setattr(ct, "load", fake_ct_load)
    for argv, want in ((["eval", "--model", str(d), "--emulate-activations"], "emulate"),
                       (["eval", "--model", str(d)], "ignore"),
                       (["bench", "--model", str(d), "--emulate-activations"], "emulate")):
        args = cli.build_parser().parse_args(argv)
        with pytest.raises(Stop):
            cli._load(args)
        assert seen[-1] == want, argv


def test_emulation_survives_int4_and_odd_group_names(tmp_path):
    """quantize_int4 (eval --int4) keeps the layers' activation hooks; a config group whose name has
    a space is still reported as emulated; an int4-kept layer's static scale takes the input's
    dtype (the library gives input_scale the model's dtype, not the int4 scales')."""
    m, info = ct.load(FIXINT8, activations="emulate")
    sk.quantize_int4(m, group_size=16)
    hooked = [n for n, mod in m.named_modules() if isinstance(mod, sk.SparseLinearInt4)
              and any(isinstance(h, ct.ActivationQuantizer) for h in mod._forward_pre_hooks.values())]
    assert len(hooked) == 14

    d = shutil.copytree(FIXINT8, tmp_path / "spaced")
    cfg = json.loads((d / "config.json").read_text())
    groups = cfg["quantization_config"]["config_groups"]
    groups["w8a8 group"] = groups.pop("group_0")
    (d / "config.json").write_text(json.dumps(cfg))
    _, info = ct.load(str(d), activations="emulate")
    assert info.quantization["emulated"] == ["w8a8 group input activations: int8 dynamic per token"]
    assert not any("input activations" in n for n in info.quantization["not_applied"])

    d = shutil.copytree(FIXMARLIN, tmp_path / "int4static")
    cfg = json.loads((d / "config.json").read_text())
    g = next(iter(cfg["quantization_config"]["config_groups"].values()))
    g["input_activations"] = dict(type="int", num_bits=8, strategy="tensor", dynamic=False, symmetric=True)
    (d / "config.json").write_text(json.dumps(cfg))
    t = load_file(str(d / "model.safetensors"))
    for n in sorted({k.rsplit(".", 1)[0] for k in t if k.endswith(".scale_packed")}):
        t[n + ".input_scale"] = torch.tensor([0.05], dtype=torch.float32)
    save_file(t, str(d / "model.safetensors"))
    m, _ = ct.load(str(d), dtype=torch.bfloat16, int4="keep", activations="emulate")
    q = m.model.layers[0].self_attn.q_proj
    assert isinstance(q, sk.SparseLinearInt4) and q.scales.dtype == torch.float16
    y = m(input_ids=torch.randint(0, 64, (1, 6))).logits
    hook = next(h for h in q._forward_pre_hooks.values() if isinstance(h, ct.ActivationQuantizer))
    assert y.dtype == torch.bfloat16 and hook.scale.dtype == torch.bfloat16
