"""Write the compressed-tensors fixtures under tests/data/compressed_tensors/ with the real library.

The fixtures are checkpoints as llm-compressor writes them, made by compressed-tensors' own
``ModelCompressor`` (its sparse compressors: version 0.12 or earlier; 0.13+ dropped sparse
compression), so tests/test_compressed_tensors.py checks our reader against the real format
without that library installed.  Regenerate (needs compressed-tensors<=0.12, transformers,
safetensors):

    PYTHONPATH=DIR_WITH_COMPRESSED_TENSORS_0_12 python tests/data/make_compressed_tensors_fixtures.py

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


def tiny_llama(dtype, arch="llama"):
    import transformers

    # intermediate 72: down_proj has 72 input columns, not a multiple of 16 (our padded path)
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=32)
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


if __name__ == "__main__":
    main()
