"""Argument and input validation of the CLI, finetune and LotteryTicket: clear errors, no silent wrong answers."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil

import pytest
import torch
from torch import nn

from conftest import save_word_model_dir
from sparse_kernels import cli
from sparse_kernels.lottery import LotteryTicket
from sparse_kernels.training import finetune, mask_zeros_

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


def _llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg).eval()


def _block_zeros(m) -> float:
    ws = [mod.weight for n, mod in m.named_modules() if n.startswith("model.layers") and type(mod) is nn.Linear]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_validation") / "llama"
    return d, save_word_model_dir(d, _llama())


def _prune(d, text, out, *args):
    return cli.main(["prune", "--model", str(d), *args, "--nsamples", "2", "--seqlen", "16",
                     "--calibration-source", str(text), "-o", str(out), "--no-progress"])


@pytest.fixture(scope="module")
def ck48(llama_dir, tmp_path_factory):
    """Our checkpoint of the tiny Llama, magnitude 4:8 (its layers stored 'masked')."""
    d, text = llama_dir
    out = tmp_path_factory.mktemp("ck48") / "ck"
    assert _prune(d, text, out, "--method", "magnitude", "--pattern", "4:8") == 0
    return out


# ---------------------------------------------------------------- finetune keeps exactly the pruned layers' zeros
def test_cli_finetune_keeps_the_zeros_of_a_low_sparsity_prune(llama_dir, tmp_path, capsys):
    from sparse_kernels.llm import checkpoint

    d, text = llama_dir
    out = tmp_path / "ft"
    assert _prune(d, text, out, "--method", "magnitude", "--sparsity", "0.05", "--finetune-steps", "2",
                  "--finetune-lr", "1e-2", "--finetune-seqlen", "16") == 0
    assert "recovery fine-tuning (masks fixed)" in capsys.readouterr().out
    m, _ = checkpoint.load(str(out))
    assert _block_zeros(m) == pytest.approx(0.05, abs=2e-3)  # 5% < mask_zeros' 10%: the zeros came back before


def test_finetune_mask_layers_masks_whatever_the_zero_fraction():
    import sparse_kernels as sk
    from sparse_kernels.llm.demo import block_layer_names

    m = _llama()
    sk.prune(m, "magnitude", 0.05, None, progress=False)
    assert mask_zeros_(copy.deepcopy(m), 0.1) == []  # the threshold alone misses a 5% layer
    zeros = _block_zeros(m)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    rep = finetune(m, ids, steps=2, lr=1e-2, batch_size=1, mask_zeros=None, mask_layers=block_layer_names(m))
    assert rep["masked_layers"] == 14 and _block_zeros(m) == zeros
    assert not any(k.endswith("_mask") for k in m.state_dict())  # the masks it attached are gone again


# ---------------------------------------------------------------- finetune's arguments and data
IDS = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kw, exc, msg", [
    (dict(mask_zeros=0), ValueError, r"mask_zeros: expected a fraction in \(0, 1\] or None, got 0"),
    (dict(mask_zeros="0.1"), TypeError, r"mask_zeros: expected a fraction in \(0, 1\] or None, got str"),
    (dict(mask_layers="model.layers.0.mlp.up_proj"), TypeError, "mask_layers: expected an iterable of layer names"),
    (dict(mask_layers=["model.embed_tokens"]), ValueError, r"mask_layers: \['model.embed_tokens'\] \(of 1\) name no"),
    (dict(max_grad_norm=-1.0), ValueError, r"max_grad_norm: expected a finite number > 0 or None, got -1.0"),
    (dict(lr=float("inf")), ValueError, "lr: expected a finite number > 0, got inf"),
    (dict(lr=0.0), ValueError, "lr: expected a finite number > 0, got 0.0"),
    (dict(lr="1e-3"), TypeError, "lr: expected a finite number > 0, got str"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay: expected a finite number >= 0, got -0.1"),
    (dict(batch_size=0), ValueError, "batch_size: must be >= 1, got 0"),
    (dict(steps=1.5), TypeError, "steps: expected an int, got float"),
    (dict(warmup=-1), ValueError, "warmup: must be >= 0, got -1"),
    (dict(token_batches=IDS + 96), ValueError,
     r"token_batches: token ids must be in \[0, 96\) \(the model's config.vocab_size\), got min 96, max"),
    (dict(token_batches=[IDS, IDS - 100]), ValueError, r"token_batches\[1\]: token ids must be in \[0, 96\)"),
    (dict(token_batches=IDS[:, :0]), ValueError, r"seqlen >= 2 .*got torch.int64 with shape \(2, 0\)"),
    (dict(token_batches=IDS[:, :1]), ValueError, r"seqlen >= 2 .*got torch.int64 with shape \(2, 1\)"),
    (dict(token_batches=IDS.float()), ValueError,
     r"token_batches: expected a LongTensor \[n, seqlen\], got torch.float32"),
    (dict(token_batches=[IDS.float()]), ValueError, r"token_batches\[0\]: .*got torch.float32 with shape \(2, 8\)"),
    (dict(token_batches=[{"input_ids": IDS + 96}]), ValueError, r"token_batches\[0\]: token ids must be in"),
    (dict(token_batches=["and the"]), TypeError, r"token_batches\[0\]: expected a LongTensor \[b, seqlen\] or a dict"),
])
def test_finetune_rejects_bad_arguments_before_touching_the_model(kw, exc, msg):
    m = _llama()
    with torch.no_grad():
        m.model.layers[0].mlp.up_proj.weight[:, ::2] = 0
    before = {k: v.clone() for k, v in m.state_dict().items()}
    kw = {"token_batches": IDS, "steps": 1, **kw}
    with pytest.raises(exc, match=msg):
        finetune(m, kw.pop("token_batches"), **kw)
    after = m.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_mask_zeros_rejects_a_string_fraction():
    with pytest.raises(TypeError, match=r"mask_zeros: expected a fraction in \(0, 1\] or None, got str"):
        mask_zeros_(_llama(), "0.1")


# ---------------------------------------------------------------- LotteryTicket.prune(rounds)
@pytest.mark.parametrize("rounds, exc, msg", [(-1, ValueError, "rounds: must be >= 0, got -1"),
                                              (1.5, TypeError, "rounds: expected an int, got float")])
def test_lottery_prune_validates_rounds_before_counting_them(rounds, exc, msg):
    torch.manual_seed(0)
    ticket = LotteryTicket(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), rate=0.2)
    with pytest.raises(exc, match=msg):
        ticket.prune(rounds)
    assert ticket.round == 0
    assert ticket.prune()["sparsity"] == pytest.approx(0.2)


# ---------------------------------------------------------------- prune: option checks (before any work)
@pytest.mark.parametrize("args, msg", [
    (["--method", "wanda", "--pattern", "2:4", "--heads", "0.5", "--drop-layers", "1", "--criterion", "taylor"],
     r"prune: --method wanda takes none of --criterion, --heads, --drop-layers \(options of --method structured\)"),
    (["--method", "magnitude", "--drop-layers", "0"], "prune: --method magnitude takes none of --drop-layers "),
    (["--method", "wanda", "--sparsity", "0"], "prune: --sparsity 0 prunes nothing with --method wanda"),
    (["--method", "structured", "--sparsity", "0"], "prune: --method structured --sparsity 0 keeps every FFN channel"),
    (["--method", "structured", "--drop-layers", "-1"], "prune: --drop-layers must be >= 0, got -1"),
    (["--method", "wanda", "--sparsity", "0.5", "--finetune-steps", "2", "--finetune-seqlen", "1"],
     "prune: --finetune-seqlen must be >= 2"),
])
def test_cli_prune_rejects_options_that_would_be_ignored(llama_dir, tmp_path, args, msg):
    d, text = llama_dir
    with pytest.raises(SystemExit, match=msg):
        _prune(d, text, tmp_path / "x", *args)
    assert not (tmp_path / "x").exists()


def test_cli_prune_help_documents_structured_sparsity_0(capsys):
    with pytest.raises(SystemExit):
        cli.main(["prune", "--help"])
    assert "0: none, to remove only --heads / --drop-layers" in " ".join(capsys.readouterr().out.split())


def test_cli_output_must_not_be_the_model_or_a_file(llama_dir, ck48, tmp_path):
    d, text = llama_dir
    stamp = os.path.getmtime(d / "model.safetensors")
    with pytest.raises(SystemExit, match=r"prune: --output .* is the --model directory"):
        _prune(d, text, d, "--method", "magnitude")
    assert os.path.getmtime(d / "model.safetensors") == stamp
    f = tmp_path / "a_file"
    f.write_text("x")
    for out in (f, f / "sub"):
        with pytest.raises(SystemExit, match=re.escape(f"prune: --output '{out}': '{f}' is a file, not a directory")):
            _prune(d, text, out, "--method", "magnitude")
    with pytest.raises(SystemExit, match=r"convert: --output .* is the --model directory"):
        cli.main(["convert", "--model", str(ck48), "--format", "compressed-tensors", "-o", str(ck48)])
    with pytest.raises(SystemExit, match="convert: --output .* is a file"):
        cli.main(["convert", "--model", str(ck48), "--format", "compressed-tensors", "-o", str(f)])


# ---------------------------------------------------------------- structured
def test_cli_structured_only_drops_layers_with_sparsity_0_over_an_old_checkpoint(llama_dir, ck48, tmp_path, capsys):
    """--sparsity 0 keeps the FFN; writing over one of our checkpoints leaves no stale sparse_kernels.json."""
    from sparse_kernels.llm import checkpoint, models

    d, text = llama_dir
    out = tmp_path / "over"
    shutil.copytree(ck48, out)
    assert _prune(d, text, out, "--method", "structured", "--sparsity", "0", "--drop-layers", "1") == 0
    assert "smaller dense model saved" in capsys.readouterr().out
    assert not (out / checkpoint.CONFIG_NAME).exists()
    m, _, src = models.load_model(str(out))
    assert src.kind == "hf" and m.config.num_hidden_layers == 1 and m.config.intermediate_size == 128


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=96, num_local_experts=4, num_experts_per_tok=2,
                                     max_position_embeddings=128)
    d = tmp_path_factory.mktemp("cli_validation_moe") / "moe"
    return d, save_word_model_dir(d, transformers.MixtralForCausalLM(cfg).eval())


def test_cli_structured_on_moe_is_one_line_not_a_traceback(moe_dir, tmp_path, capsys):
    d, text = moe_dir
    assert _prune(d, text, tmp_path / "s", "--method", "structured") == 2
    err = capsys.readouterr().err  # (above it: transformers' "Loading weights" bar)
    assert re.search(r"(^|\n)sparse-kernels prune: error: model: MixtralForCausalLM [^\n]*\n$", err), err
    assert "Traceback" not in err and not (tmp_path / "s").exists()


def test_cli_permute_with_experts_points_at_skip(moe_dir, tmp_path):
    d, text = moe_dir
    with pytest.raises(SystemExit, match=r"prune: --permute: model.layers.0.mlp.experts.gate_up_proj\[0\].gate is an "
                                         r"expert's matrix .* leave the experts dense with --skip experts"):
        _prune(d, text, tmp_path / "p", "--method", "wanda", "--pattern", "2:4", "--permute")


# ---------------------------------------------------------------- convert ours (masked N:M) -> compressed-tensors
def test_cli_convert_masked_checkpoint_to_compressed_tensors(ck48, tmp_path, capsys):
    from sparse_kernels.llm import models
    from sparse_kernels.nn import SparseLinear

    out = tmp_path / "ct"
    assert cli.main(["convert", "--model", str(ck48), "--format", "compressed-tensors", "-o", str(out)]) == 0
    assert "to sparse-bitmask" in capsys.readouterr().out
    sc = json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sc["format"] == "sparse-bitmask" and len(sc["targets"]) == 14
    ours, _, _ = models.load_model(str(ck48))
    theirs, _, src = models.load_model(str(out))
    assert src.kind == "compressed-tensors" and sum(isinstance(x, SparseLinear) for x in theirs.modules()) == 14
    ids = torch.randint(0, 20, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits)
