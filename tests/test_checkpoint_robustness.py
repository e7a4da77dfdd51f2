"""Checkpoint robustness: failed saves leave the old checkpoint as it was, loads keep every stored
dtype and refuse mismatched models, malformed manifests and bad arguments with a clear error
(llm.checkpoint, llm.compressed_tensors, llm.models, storage)."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import torch
import torch.nn as nn

from conftest import assert_bitexact

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import sparse_kernels as sk  # noqa: E402
from sparse_kernels import load_sparse, save_sparse  # noqa: E402
from sparse_kernels.llm import checkpoint, models  # noqa: E402
from sparse_kernels.llm import compressed_tensors as ct  # noqa: E402
from sparse_kernels.llm.checkpoint import CheckpointError  # noqa: E402
from sparse_kernels.storage import SparseStateError  # noqa: E402


def _tiny_llama(dtype=torch.float32):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    return checkpoint._to_dtype(transformers.LlamaForCausalLM(cfg).eval(), dtype)


def _pruned(convert=False):
    m = _tiny_llama()
    sk.prune(m, method="magnitude", sparsity="2:4", convert=convert, progress=False)
    return m


def _files(d):
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d))}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("robust") / "good"
    checkpoint.save(_pruned(), str(d))
    return d


@pytest.fixture
def ck(good, tmp_path):
    return shutil.copytree(good, tmp_path / "ck")


class _Tokenizer:
    """Writes one file, then fails when ``fail`` is set (after writing, as a real one might)."""

    def __init__(self, fail=False):
        self.fail = fail

    def save_pretrained(self, d):
        with open(os.path.join(d, "tokenizer.json"), "w") as f:
            f.write("{}")
        if self.fail:
            raise OSError("tokenizer: disk full")


# ---------------------------------------------------------------- 1, 2: failed saves
@pytest.mark.parametrize("kw,err,msg", [
    ({"pruning": {"t": torch.tensor(1.0)}}, TypeError, "pruning: must hold only JSON values .*Tensor is not JSON"),
    ({"base_model": "llama"}, TypeError, "base_model: expected a dict or None, got str 'llama'"),
    ({"base_model": {"dtype": torch.float16}}, TypeError, "base_model: must hold only JSON values"),
    ({"tokenizer": object()}, TypeError, "tokenizer: expected None or a tokenizer with save_pretrained"),
    ({"tokenizer": _Tokenizer(fail=True)}, OSError, "tokenizer: disk full"),
])
def test_failed_save_leaves_the_old_checkpoint_and_no_new_directory(ck, tmp_path, kw, err, msg):
    before = _files(ck)
    m = _pruned()
    with torch.no_grad():
        m.model.norm.weight.mul_(2)  # other tensors than the saved ones
    with pytest.raises(err, match=msg):
        checkpoint.save(m, str(ck), **kw)
    assert _files(ck) == before  # nothing replaced, no temporary file or folder left
    checkpoint.load(str(ck))
    with pytest.raises(err, match=msg):
        checkpoint.save(_pruned(), str(tmp_path / "new"), **kw)
    assert not (tmp_path / "new").exists()


def test_save_with_a_tokenizer_moves_its_files_in_last(tmp_path):
    cfg = checkpoint.save(_pruned(), str(tmp_path / "ck"), tokenizer=_Tokenizer())
    assert cfg["tokenizer_saved"] and sorted(os.listdir(tmp_path / "ck")) == [
        checkpoint.TENSORS_NAME, checkpoint.CONFIG_NAME, "tokenizer.json"]


def test_compressed_tensors_save_failure_keeps_our_checkpoint(ck, monkeypatch):
    before = _files(ck)
    m = _pruned(convert=True)
    with pytest.raises(OSError, match="tokenizer: disk full"):
        ct.save(m, str(ck), tokenizer=_Tokenizer(fail=True))
    assert _files(ck) == before
    import safetensors.torch

    def boom(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    with monkeypatch.context() as mp:
        mp.setattr(safetensors.torch, "save_file", boom)
        with pytest.raises(OSError, match="disk full"):
            ct.save(m, str(ck))
    assert _files(ck) == before
    checkpoint.load(str(ck))
    ct.save(m, str(ck))  # once the new files are in, the stale manifest of ours goes
    assert sorted(os.listdir(ck)) == ["config.json", "model.safetensors"]
    assert models.resolve(str(ck)).kind == "compressed-tensors"


# ---------------------------------------------------------------- 3: every tensor keeps its stored dtype
def test_minority_dtypes_come_back_bit_exact(tmp_path):
    m = _tiny_llama(torch.bfloat16)
    sk.prune(m, method="magnitude", sparsity="2:4", progress=False)
    g = torch.Generator().manual_seed(1)
    m.model.norm.weight = nn.Parameter(1 + torch.randn(64, generator=g) / 100)  # float32 in a bfloat16 model
    emb = nn.Parameter(torch.randn(96, 64, generator=g))  # a float32 tied pair
    m.model.embed_tokens.weight = m.lm_head.weight = emb
    checkpoint.save(m, str(tmp_path / "ck"))
    want = m.state_dict()
    for model in (None, _tiny_llama()):
        back, _ = checkpoint.load(str(tmp_path / "ck"), model=model)
        got = back.state_dict()
        assert got.keys() == want.keys()
        for k in want:
            assert_bitexact(got[k], want[k], k)
        assert back.lm_head.weight is back.model.embed_tokens.weight
        assert back.model.layers[0].input_layernorm.weight.dtype == torch.bfloat16


# ---------------------------------------------------------------- 4: load(model=...) must fit
@pytest.fixture(scope="module")
def linear_cks(tmp_path_factory):
    """``{kind: (checkpoint, the saved Sequential)}`` for a 2:4 Linear(128, 32) and a bitmask one."""
    d = tmp_path_factory.mktemp("lin")
    g = torch.Generator().manual_seed(0)
    a, b = nn.Linear(128, 32), nn.Linear(128, 32)
    with torch.no_grad():
        a.weight.mul_(torch.tensor([1.0, 1.0, 0.0, 0.0]).repeat(32, 32))
        b.weight.mul_((torch.rand(32, 128, generator=g) > 0.5).float())
    out = {"24": nn.Sequential(a), "bm": nn.Sequential(sk.SparseLinear.from_dense(b, pattern="bitmask"))}
    checkpoint.save(out["24"], str(d / "24"), layers={"0": "2:4"})
    checkpoint.save(out["bm"], str(d / "bm"))
    return {k: (str(d / k), m) for k, m in out.items()}


@pytest.mark.parametrize("which,module,msg", [
    ("24", nn.Linear(64, 32), "2:4 layer '0': the checkpoint records a linear layer with in_features 128, "
                              "out_features 32; the model holds a module of type Linear with in_features 64, "
                              "out_features 32 there"),
    ("24", nn.Embedding(128, 32), "2:4 layer '0': .* holds a module of type Embedding there"),
    ("bm", nn.Linear(64, 32), "unstructured layer '0': .* type Linear with in_features 64, out_features 32 there"),
    ("bm", nn.Conv1d(128, 32, 1), "unstructured layer '0': .* type Conv1d there"),
])
def test_load_refuses_a_model_of_another_shape(linear_cks, which, module, msg):
    with pytest.raises(CheckpointError, match=msg):
        checkpoint.load(linear_cks[which][0], model=nn.Sequential(module))


@pytest.mark.parametrize("which", ["24", "bm"])
def test_load_into_linear_like_modules_of_the_recorded_shape(linear_cks, which):
    from transformers.pytorch_utils import Conv1D

    path, saved = linear_cks[which]
    x = torch.randn(3, 128)
    for skeleton in (nn.Linear(128, 32), Conv1D(32, 128), saved[0]):
        back, _ = checkpoint.load(path, model=nn.Sequential(skeleton))
        assert isinstance(back[0], sk.SparseLinear) and back[0].pattern == saved[0].pattern
        assert_bitexact(back(x), saved(x))


# ---------------------------------------------------------------- 5: malformed manifests
def _edit(ck, edit, name=checkpoint.CONFIG_NAME):
    p = os.path.join(ck, name)
    cfg = json.loads(open(p).read())
    edit(cfg)
    open(p, "w").write(json.dumps(cfg))


@pytest.mark.parametrize("edit,msg", [
    (lambda c: c.update(layers=[]), r"'layers' must be a JSON object, got \[\]"),
    (lambda c: c.update(masked=[]), r"'masked' must be a JSON object, got \[\]"),
    (lambda c: c.update(bitmask=5), r"'bitmask' must be a JSON object, got 5"),
    (lambda c: c.update(aliases=[]), r"'aliases' must be a JSON object, got \[\]"),
    (lambda c: c.update(aliases={"lm_head.weight": 5}), "the alias 'lm_head.weight' must be the name of a stored "
                                                        "tensor, got 5"),
    (lambda c: c.update(tensors_bytes=str(c["tensors_bytes"])), "'tensors_bytes' must be a non-negative int, got '"),
    (lambda c: c.update(tensors_sha256=None), "'tensors_sha256' must be a hex string, got None"),
    (lambda c: c["tensors"]["model.norm.weight"].pop("shape"), r"the 'tensors' entry 'model.norm.weight' must be "
                                                               r"\{\"shape\": \[non-negative ints\]"),
    (lambda c: c["tensors"].update({"model.norm.weight": 5}), "'tensors' entry 'model.norm.weight' must be .*got 5"),
    (lambda c: c["tensors"]["model.norm.weight"].update(shape=[64.0]), "'model.norm.weight' must be .*got"),
    (lambda c: c.update(tensors_file=5), "'tensors_file' must be a file name in the checkpoint directory, got 5"),
    (lambda c: c.update(tensors_file="../model.safetensors"), "'tensors_file' must be a file name"),
    (lambda c: c["model_config"].pop("model_type"), "'model_config' must be null or a JSON object with a string "
                                                    "'model_type', got {'model_type': None}"),
    (lambda c: c.update(model_config=[1, 2]), r"'model_config' must be .*, got \[1, 2\]"),
    (lambda c: c["model_config"].update(hidden_size="x"), "cannot build a model from its model_config .*hidden_size"),
    (lambda c: c["model_config"].update(model_type="no-such-model"), "cannot build a model from its model_config"),
])
def test_malformed_manifest_is_named(ck, edit, msg):
    _edit(ck, edit)
    with pytest.raises(CheckpointError, match=msg):
        checkpoint.load(str(ck))


@pytest.fixture(scope="module")
def ct_ck(tmp_path_factory):
    d = tmp_path_factory.mktemp("ct") / "ck"
    ct.save(_pruned(convert=True), str(d))
    return d


def test_compressed_tensors_config_that_builds_no_model(ct_ck, tmp_path):
    d = shutil.copytree(ct_ck, tmp_path / "ck")
    _edit(d, lambda c: c.update(hidden_size="x"), "config.json")
    with pytest.raises(ct.CompressedTensorsError, match="cannot build model_type 'llama' from config.json .*hidden"):
        ct.load(str(d))


# ---------------------------------------------------------------- 6: save_sparse / load_sparse
@pytest.fixture
def sparse_file(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    with torch.no_grad():
        net[2].weight.mul_(torch.rand(32, 64) > 0.7)
    path = str(tmp_path / "m.safetensors")
    assert save_sparse(net, path).formats["2.weight"] == "bitmask"
    return path, net


def _header(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    return raw, n, json.loads(raw[8:8 + n])


@pytest.mark.parametrize("stored,entry", [("0.bias", "0.bias"), ("2.weight::values", "2.weight")])
def test_load_sparse_detects_a_flipped_byte(sparse_file, stored, entry):
    path, _ = sparse_file
    raw, n, hdr = _header(path)
    b = bytearray(raw)
    b[8 + n + hdr[stored]["data_offsets"][0] + 3] ^= 0x40
    open(path, "wb").write(bytes(b))
    with pytest.raises(SparseStateError, match=rf"^{entry}: corrupted: the SHA-256 of its stored tensors is "):
        load_sparse(path)


def _set_description(path, edit):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    desc = json.loads(meta["sparse_kernels"])
    edit(desc)
    save_file(tensors, path, metadata={"sparse_kernels": json.dumps(desc)})


def test_load_sparse_reads_version_1_without_checksums_but_not_version_2(sparse_file):
    path, net = sparse_file

    def drop(version):
        def edit(desc):
            desc["format_version"] = version
            for e in desc["entries"].values():
                e.pop("sha256", None)
        return edit

    _set_description(path, drop(2))
    with pytest.raises(SparseStateError, match="^0.weight: no 'sha256' recorded"):
        load_sparse(path)
    _set_description(path, drop(1))
    state = load_sparse(path)
    for k, v in net.state_dict().items():
        assert_bitexact(state[k], torch.where(v == 0, torch.zeros(()), v), k)


def test_storage_arguments(sparse_file, tmp_path):
    path, net = sparse_file
    with pytest.raises(TypeError, match="path: expected a str or os.PathLike, got int 5"):
        load_sparse(5)
    with pytest.raises(TypeError, match="path: expected a str or os.PathLike, got int 5"):
        save_sparse(net, 5)
    with pytest.raises(TypeError, match="model: expected an nn.Module, got int 5"):
        load_sparse(path, model=5)
    with pytest.raises(TypeError, match="strict: expected True or False, got 'no'"):
        load_sparse(path, model=net, strict="no")
    with pytest.raises(ValueError, match="path: '.*' is a directory; save_sparse writes one file"):
        save_sparse(net, str(tmp_path))
    with pytest.raises(TypeError, match="formats: expected a str or a tuple of them, got NoneType"):
        save_sparse(net, path, formats=None)
    other = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32))
    with pytest.raises(ValueError, match="(?s)model: the tensors of .* do not fit this Sequential: .*size mismatch"):
        load_sparse(path, model=other)


# ---------------------------------------------------------------- 7, 8: bad arguments, tokenizer source
@pytest.mark.parametrize("kw,err,msg", [
    ({"dtype": "bf16"}, TypeError, "dtype: expected None or a floating-point torch.dtype .*got 'bf16'"),
    ({"dtype": torch.int8}, TypeError, "dtype: expected None or a floating-point torch.dtype"),
    ({"device": "gpu"}, ValueError, "device: 'gpu' is not a device torch can use here"),
    ({"model": 5}, TypeError, "model: expected an nn.Module, got int 5"),
    ({"verify_hash": "no"}, TypeError, "verify_hash: expected True or False, got 'no'"),
])
def test_load_arguments(good, ct_ck, kw, err, msg):
    with pytest.raises(err, match=msg):
        checkpoint.load(str(good), **kw)
    if "dtype" in kw or "device" in kw:
        with pytest.raises(err, match=msg):
            ct.load(str(ct_ck), **kw)
        with pytest.raises(err, match=msg):
            models.load_model(str(good), **kw)


@pytest.mark.parametrize("args,kw,err,msg", [
    ((5,), {}, TypeError, "model: expected an nn.Module, got int 5"),
    ((), {"layers": {"nope": "masked"}}, ValueError, r"layers: \['nope'\] are not modules of LlamaForCausalLM"),
    ((), {"layers": ["model.norm"]}, TypeError, "layers: expected a dict"),
    ((nn.Linear(64, 32),), {"layers": {"": "masked"}}, ValueError, r"layers: the model itself \('', a Linear\) "
                                                                   r"cannot be a layer of its checkpoint"),
])
def test_save_arguments(tmp_path, args, kw, err, msg):
    with pytest.raises(err, match=msg):
        checkpoint.save(*(args or (_tiny_llama(),)), str(tmp_path / "ck"), **kw)
    assert not (tmp_path / "ck").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="path: '.*file' exists and is not a directory"):
        checkpoint.save(_tiny_llama(), str(tmp_path / "file"))
    with pytest.raises(TypeError, match="path: expected a str or os.PathLike, got int 5"):
        ct.save(_pruned(convert=True), 5)


@pytest.mark.parametrize("base", [{}, "llama", {"path": "x", "gguf_file": 5}])
def test_load_model_without_a_tokenizer_source(ck, base):
    _edit(ck, lambda c: c.update(base_model=base))
    with pytest.raises(ValueError, match=r"saved without its tokenizer and its base_model .* names no tokenizer "
                                         r"source"):
        models.load_model(str(ck))
