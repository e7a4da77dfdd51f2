"""save_sparse / load_sparse: formats chosen, round trips (bits, zeros up to sign), sizes,
aliases, atomic writes, and every corruption refused with the entry named."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from conftest import assert_bitexact
from sparse_kernels import load_sparse, prune, save_sparse
from sparse_kernels.storage import SparseStateError, _digest, _view2d

pytest.importorskip("safetensors")


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def assert_round_trip(a: torch.Tensor, b: torch.Tensor, what: str):
    """Equal bits, but a zero may come back with the other sign."""
    assert a.shape == b.shape and a.dtype == b.dtype, what
    if not a.is_floating_point():
        assert torch.equal(a, b), what
        return
    same = (_bits(a) == _bits(b)) | ((a == 0) & (b == 0))
    assert bool(same.all()), f"{what}: {int((~same).sum())} elements differ"


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 64)
        self.head = nn.Linear(64, 10)
        self.emb = nn.Embedding(10, 64)
        self.head.weight = self.emb.weight  # tied

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.head(torch.relu(self.fc(h)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_formats_round_trips_and_sizes(tmp_path, dtype):
    torch.manual_seed(0)
    model = Net().to(dtype)
    with torch.no_grad():
        model.bn.running_mean.normal_()
    prune(model, "magnitude", "2:4", blocks=[model], layer_filter=lambda n, m: n == "conv", progress=False)
    prune(model, "magnitude", 0.7, blocks=[model], layer_filter=lambda n, m: n == "fc", progress=False)
    with torch.no_grad():  # special values survive
        model.fc.weight[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
    path = str(tmp_path / "m.safetensors")
    report = save_sparse(model, path)
    assert report.formats["conv.weight"] == "2:4" and report.formats["fc.weight"] == "bitmask"
    assert report.formats["emb.weight"] == "alias" or report.formats["head.weight"] == "alias"
    assert report.formats["bn.num_batches_tracked"] == "dense"
    n = model.conv.weight.numel()
    if dtype != torch.float32:  # a 16-bit 2:4 weight takes exactly 9/16 of its dense bytes
        assert 16 * (n // 2 * 2 + n // 16 * 2) == 9 * (n * 2)
    assert report.stored_bytes < report.dense_bytes and report.file_bytes == os.path.getsize(path)
    state = load_sparse(path)
    want = model.state_dict()
    assert list(state) == list(want)
    for k, v in want.items():
        assert_round_trip(state[k], v, k)
    fresh = Net().to(dtype)
    load_sparse(path, model=fresh)
    x = torch.randn(2, 16, 6, 6, dtype=dtype)
    model.eval(), fresh.eval()
    with torch.no_grad():
        a, b = model(x), fresh(x)
    assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))


def test_the_2to4_view_of_a_convolution_is_channels_last(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(8, 16, 3, 3)
    groups = _view2d(w).reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep[:, :2] = True
    w24 = (groups * keep).reshape(8, 3, 3, 16).permute(0, 3, 1, 2).contiguous()  # 2:4 along channels only
    plain = w24.permute(0, 2, 3, 1).contiguous()  # the same values stored [out, kh, kw, C]
    path = str(tmp_path / "c.safetensors")
    report = save_sparse({"w": w24, "plain": plain}, path)
    assert report.formats == {"w": "2:4", "plain": "2:4"}
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        entries = json.loads(f.metadata()["sparse_kernels"])["entries"]
    assert entries["w"]["view"] == "channels_last"  # its last dim (3) cannot hold groups of 16
    assert entries["plain"]["view"] == "rows"  # its channels are already last
    back = load_sparse(path)
    assert_round_trip(back["w"], w24, "conv weight")
    assert_round_trip(back["plain"], plain, "rows view")


def test_dense_when_nothing_is_saved_and_keys_checked(tmp_path):
    torch.manual_seed(0)
    state = {"dense": torch.randn(8, 32), "small_zeros": torch.randn(8, 32) * (torch.rand(8, 32) > 0.1),
             "vec": torch.zeros(16), "ints": torch.arange(6).view(2, 3), "empty": torch.zeros(0, 4)}
    report = save_sparse(state, str(tmp_path / "d.safetensors"))
    assert set(report.formats.values()) == {"dense"}
    back = load_sparse(str(tmp_path / "d.safetensors"))
    for k, v in state.items():
        assert_bitexact(back[k], v, k) if v.is_floating_point() else None
    with pytest.raises(ValueError, match="obj: key 'a::b' contains '::'"):
        save_sparse({"a::b": torch.zeros(2, 2)}, str(tmp_path / "e.safetensors"))
    with pytest.raises(TypeError, match="obj: expected an nn.Module or a dict"):
        save_sparse([torch.zeros(2)], str(tmp_path / "e.safetensors"))
    with pytest.raises(ValueError, match="formats: unknown 'csr'"):
        save_sparse(state, str(tmp_path / "e.safetensors"), formats=("csr",))
    assert not os.path.exists(tmp_path / "e.safetensors")


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    import safetensors.torch

    path = str(tmp_path / "f.safetensors")
    save_sparse({"a": torch.ones(2, 2)}, path)
    before = open(path, "rb").read()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_sparse({"a": torch.zeros(2, 2)}, path)
    assert open(path, "rb").read() == before
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []


def _rewrite(path, tensors=None, meta=None):
    """Edit the tensors and/or the description, with each entry's SHA-256 following the tensors,
    so that only the structural checks can catch the damage."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        m = f.metadata()
    if tensors:
        tensors(t)
    desc = json.loads(m["sparse_kernels"])
    for key, entry in desc["entries"].items():
        if entry["format"] != "alias":
            entry["sha256"] = _digest({k: v for k, v in t.items() if k == key or k.startswith(key + "::")})
    if meta:
        meta(desc)
    save_file(t, path, metadata={"sparse_kernels": json.dumps(desc)})


def test_corrupt_files_are_refused_with_the_entry_named(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    w24 = torch.randn(4, 32, dtype=torch.float16)
    w24 = w24 * (_view2d(w24).reshape(-1, 4).abs().argsort(-1).argsort(-1) >= 2).reshape(4, 32)
    wbm = torch.randn(4, 40) * (torch.rand(4, 40) > 0.8)
    path = str(tmp_path / "g.safetensors")

    def fresh():
        r = save_sparse({"w24": w24, "wbm": wbm}, path)
        assert r.formats == {"w24": "2:4", "wbm": "bitmask"}

    cases = [
        (lambda t: t["w24::meta"].fill_(0), None, r"w24: the 2:4 tensors are inconsistent"),  # i0 == i1 nibbles
        (lambda t: t["wbm::row_ptr"].__setitem__(1, 3), None, r"wbm: the bitmask tensors are inconsistent"),
        (lambda t: t.pop("w24::values"), None, r"w24: a 2:4 entry needs the tensors values, meta"),
        (lambda t: t.__setitem__("w24::values", t["w24::values"].float()), None, r"w24: values are torch.float32"),
        (None, lambda d: d["entries"]["w24"].__setitem__("shape", [4, 48]), r"w24: values \(4, 16\) / meta"),
        (None, lambda d: d["entries"]["w24"].__setitem__("format", "csr"), r"w24: unknown format 'csr'"),
        (None, lambda d: d.__setitem__("format_version", 99), r"format version 99"),
        (lambda t: t.__setitem__("stray", torch.zeros(1)), None, r"tensors \['stray'\] belong to no entry"),
    ]
    for tensors, meta, msg in cases:
        fresh()
        _rewrite(path, tensors, meta)
        with pytest.raises(SparseStateError, match=msg):
            load_sparse(path)
    save_file({"a": torch.zeros(1)}, path)
    with pytest.raises(SparseStateError, match="has no 'sparse_kernels' metadata"):
        load_sparse(path)
    open(path, "wb").write(b"not a safetensors file")
    with pytest.raises(SparseStateError, match="is not a readable safetensors file"):
        load_sparse(path)
    with pytest.raises(FileNotFoundError, match="path: no file at"):
        load_sparse(str(tmp_path / "missing.safetensors"))


def test_aliases_views_subnormals_and_file_mode(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(32, 32)
    w[w.abs() < 0.7] = 0
    base = torch.randn(64, 16)
    state = {
        "w": w, "w_tied": w,  # the same tensor: an alias
        "w_flat": w.view(-1, 16),  # the same storage, another shape: its own entry
        "half": base[:32],  # a slice of a bigger storage ...
        "other_half": base[32:],  # ... and the rest of it: two entries, not aliases
        "neg": torch._neg_view(w),  # a lazily negated view: stored as its values
    }
    path = str(tmp_path / "a.safetensors")
    report = save_sparse(state, path)
    assert report.formats["w_tied"] == "alias" and report.formats["half"] != "alias"
    assert report.formats["other_half"] != "alias" and report.formats["neg"] != "alias"
    back = load_sparse(path)
    for k, v in state.items():
        assert_round_trip(back[k], v.resolve_neg(), k)
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o666 & ~_umask())
    # subnormals are values, also with denormals flushed (bits decide what is a zero)
    tiny = torch.full((8, 16), 1e-40) * (torch.rand(8, 16) > 0.5)
    torch.set_flush_denormal(True)  # where the CPU supports it, 1e-40 != 0 is False now
    try:
        save_sparse({"tiny": tiny}, path)
    finally:
        torch.set_flush_denormal(False)
    assert_bitexact(load_sparse(path)["tiny"], tiny, "subnormals")
    with pytest.raises(TypeError, match="obj: entry 'x' is a dict"):
        save_sparse({"x": {"a": 1}}, path)


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_stacked_expert_weights_are_stored_2to4_along_their_last_dimension(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(4, 8, 32, dtype=torch.bfloat16)  # [experts, out, in], 2:4 along `in`
    from sparse_kernels.pruning import magnitude_prune

    w = magnitude_prune(w.reshape(-1, 32), "2:4")[0].reshape(4, 8, 32)
    conv = torch.randn(8, 16, 3, dtype=torch.bfloat16)  # a Conv1d weight, 2:4 along channels
    conv = _from_view(magnitude_prune(_view2d(conv), "2:4")[0], conv.shape)
    path = str(tmp_path / "moe.safetensors")
    report = save_sparse({"experts": w, "conv1d": conv}, path)
    assert report.formats == {"experts": "2:4", "conv1d": "2:4"}
    back = load_sparse(path)
    assert_round_trip(back["experts"], w, "experts")
    assert_round_trip(back["conv1d"], conv, "conv1d")
    _rewrite(path, None, lambda d: d["entries"]["experts"].__setitem__("view", "diagonal"))
    with pytest.raises(SparseStateError, match="experts: view 'diagonal' is not"):
        load_sparse(path)


def _from_view(v, shape):
    from sparse_kernels.storage import _from_view2d

    return _from_view2d(v, tuple(shape))
