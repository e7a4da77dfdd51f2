"""The README's quick start runs as written: each statement of its code block, on tiny stand-ins
for the names it leaves to the reader (a causal LM, token ids, a CNN, images, checkpoints)."""

from __future__ import annotations

import ast
import os
import re

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "data", "compressed_tensors")
PATHS = {  # the README's placeholder checkpoints -> the test fixtures of that kind
    "path/to/a-2of4-llm-compressor-model": "llama_2of4_bf16",
    "path/to/a-2of4-w4a16-model": "llama_2of4_w4a16_marlin24_fp16",
    "path/to/a-2of4-fp8-dynamic-model": "llama_2of4_fp8_dynamic_bf16",
}


def quick_start() -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text[text.index("## Quick start"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def tiny_moe():
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=256, num_local_experts=4, num_experts_per_tok=2)
    return transformers.MixtralForCausalLM(cfg).eval()


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.bn(self.conv1(x)))))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.ModuleList(Block(16) for _ in range(2))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean((2, 3)))


def test_quick_start_runs(tmp_path, monkeypatch, capsys):
    code = quick_start()
    for placeholder, fixture in PATHS.items():
        assert placeholder in code, f"the README no longer names {placeholder!r}: update PATHS"
        code = code.replace(placeholder, os.path.join(FIXTURES, fixture))
    monkeypatch.chdir(tmp_path)  # compressed_tensors.save(model, "out/...") writes here
    torch.manual_seed(0)
    w_unstructured = torch.randn(256, 256) * (torch.rand(256, 256) > 0.5)
    unstructured_model = nn.Sequential(nn.Linear(256, 256))
    with torch.no_grad():
        unstructured_model[0].weight.mul_(torch.rand(256, 256) > 0.5)
    ns = dict(model=None, moe_model=tiny_moe(), token_ids=torch.randint(0, 256, (4, 32)), cnn=CNN().eval(),
              images=torch.randn(8, 3, 12, 12), w_unstructured=w_unstructured, x=torch.randn(3, 256),
              unstructured_model=unstructured_model)
    tree = ast.parse(code)
    for stmt in tree.body:
        src = ast.get_source_segment(code, stmt)
        # each prune / sparsify of `model` is an alternative: it starts from a fresh dense model
        if re.search(r"sk\.(prune|sparsify)\(model\b", src):
            ns["model"] = tiny_llama()
        try:
            exec(compile(ast.Module([stmt], []), "README quick start", "exec"), ns)
        except Exception as e:  # noqa: BLE001 - name the README line that failed
            raise AssertionError(f"README quick start line {stmt.lineno}: {src!r} raised {type(e).__name__}: {e}")
    out = capsys.readouterr().out
    assert "quantize_int4: 14 layers swapped" in out  # the printed reports
    assert "sparsify: 14 layers swapped" in out and "prune: method=sparsegpt sparsity=2:4 layers=14" in out
    assert os.path.isdir(tmp_path / "out" / "2of4-ct")
    assert type(ns["moe_model"].model.layers[1].mlp.experts).__name__ == "SparseExperts"
