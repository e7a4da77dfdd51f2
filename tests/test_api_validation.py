"""Argument checks of prune, structured_prune and prune_channels: bad input raises a clear
ValueError/TypeError naming the argument before the model (or any calibration pass) is touched."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sparse_kernels as sk
from sparse_kernels.structured import prune_channels, structured_prune

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 96, (4, 8), generator=torch.Generator().manual_seed(0))
IDS[0, 0], IDS[-1, -1] = 0, 95  # the whole vocabulary's range, for exact min/max in the messages


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def llama():
    """Shared by the tests whose call must raise before changing it (each checks it did not)."""
    return tiny_llama()


def unchanged(model, state):
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_prune_layer_filter_selecting_nothing_raises_before_calibration(llama):
    state = copy.deepcopy(llama.state_dict())
    read = []

    def calibration():
        read.append(1)
        yield IDS

    nothing = lambda name, module: False  # noqa: E731
    msg = "layer_filter: selected none of the 14 prunable layers in the 2 blocks; nothing to prune"
    with pytest.raises(ValueError, match=msg):
        sk.prune(llama, "wanda", 0.5, calibration(), layer_filter=nothing, progress=False)
    with pytest.raises(ValueError, match=msg):
        sk.prune(llama, "magnitude", 0.5, scope="global", layer_filter=nothing, progress=False)
    with pytest.raises(ValueError, match="blocks: the 1 blocks hold no prunable layer"):
        sk.prune(llama, "wanda", 0.5, calibration(), blocks=[nn.ReLU()], progress=False)
    with pytest.raises(TypeError, match="layer_filter: expected a callable f\\(name, module\\) -> bool, got str"):
        sk.prune(llama, "wanda", 0.5, calibration(), layer_filter="mlp", progress=False)
    assert read == [] and unchanged(llama, state)


@pytest.mark.parametrize("option", [
    dict(layer_filter=lambda n, m: True), dict(int4=16), dict(device="cpu"), dict(blocks=[]), dict(blocksize=64),
    dict(percdamp=0.1), dict(backend="torch"), dict(calibrate_all_experts=False), dict(scope="row"),
])
def test_prune_structured_rejects_the_block_by_block_options(llama, option):
    (name,) = option
    with pytest.raises(ValueError, match=f"method 'structured' prunes the whole model its own way and takes none of "
                                         f"owl, .*, calibrate_all_experts; got {name}$"):
        sk.prune(llama, "structured", 0.5, IDS, progress=False, **option)
    assert llama.config.intermediate_size == 128


def test_prune_structured_rejects_unknown_options(llama):
    with pytest.raises(TypeError, match=r"method 'structured' takes no options \['alpha'\] \(it takes criterion, "
                                        r"heads, layers, round_to\)"):
        sk.prune(llama, "structured", 0.5, IDS, alpha=1.0)


@pytest.mark.parametrize("calibration,err,msg", [
    (IDS + 100, ValueError, r"calibration: token ids must be in \[0, 96\) \(the model's config.vocab_size\), "
                            r"got min 100, max 195"),
    (IDS - 3, ValueError, r"calibration: token ids must be in \[0, 96\) .*got min -3, max 92"),
    (IDS[:, :0], ValueError, r"calibration: needs at least one sequence of at least one token, got shape \(4, 0\)"),
    ({"input_ids": IDS}, TypeError, r"calibration: got a dict, which would be read as its keys; give a list of "
                                    r"batches, each a dict of keyword arguments"),
    ([IDS, "x"], TypeError, r"calibration\[1\]: expected a batch: a tensor, a tuple of positional arguments or a "
                            r"dict of keyword arguments, got str"),
    ([{"input_ids": IDS + 96}], ValueError, r"calibration\[0\]\['input_ids'\]: token ids must be in \[0, 96\) .*got min 96, max 191"),
    ([(IDS.float(),)], TypeError, r"calibration\[0\]\[0\]: expected a LongTensor \[n, seqlen\] of token ids, "
                                  r"got float32 \(4, 8\)"),
    ([()], ValueError, r"calibration\[0\]: expected positional arguments led by the token ids, "
                       r"got an empty tuple"),
])
def test_prune_calibration_checks(llama, calibration, err, msg):
    state = copy.deepcopy(llama.state_dict())
    with pytest.raises(err, match=msg):
        sk.prune(llama, "wanda", 0.5, calibration, progress=False)
    assert unchanged(llama, state)


def test_prune_takes_tuple_and_dict_batches():
    rep = sk.prune(tiny_llama(), "wanda", 0.5, [(IDS[:2],), {"input_ids": IDS[2:]}], progress=False)
    assert rep.overall_sparsity == 0.5


@pytest.mark.parametrize("method,scope", [("wanda", "row"), ("magnitude", "layer"), ("magnitude", "global")])
def test_prune_scope_with_an_nm_pattern(llama, method, scope):
    with pytest.raises(ValueError, match=f"scope='{scope}' chooses the comparison group of an unstructured sparsity; "
                                         f"'2:4' keeps 2 of every group of 4 whatever the scope"):
        sk.prune(llama, method, "2:4", IDS, scope=scope, progress=False)
    assert not (llama.model.layers[0].mlp.up_proj.weight == 0).any()


@pytest.mark.parametrize("kw,err,msg", [
    (dict(calibration=IDS + 200), ValueError, r"calibration: token ids must be in \[0, 96\) .*got min 200, max 295"),
    (dict(calibration=IDS[:0]), ValueError, r"calibration: needs at least one sequence .*got shape \(0, 8\)"),
    (dict(calibration=IDS[:, :0]), ValueError, r"calibration: needs at least one sequence .*got shape \(4, 0\)"),
    (dict(calibration=[IDS[0]]), ValueError, r"calibration\[0\]: expected token ids of shape \[n, seqlen\], "
                                             r"got shape \(8,\)"),
    (dict(calibration=[(IDS,)]), TypeError, r"calibration\[0\]: expected a batch: a tensor or a dict of keyword "
                                            r"arguments, got tuple"),
    (dict(calibration={"input_ids": IDS}), TypeError, "calibration: got a dict, which would be read as its keys"),
    (dict(calibration=IDS, batch_size=0), ValueError, "batch_size: expected an int >= 1, got 0"),
    (dict(calibration=IDS, layers=1.5), TypeError, "layers: expected an int count or a list of layer indices, "
                                                   "got float"),
    (dict(calibration=IDS, layers=[0.5]), TypeError, "layers: expected int layer indices, got 0.5"),
])
def test_structured_prune_checks(llama, kw, err, msg):
    with pytest.raises(err, match=msg):
        structured_prune(llama, 0.5, criterion="activation", **kw)
    assert llama.config.intermediate_size == 128 and len(llama.model.layers) == 2


def test_structured_prune_int32_ids_with_taylor():
    _, rep = structured_prune(tiny_llama(), 0.25, IDS.int(), criterion="taylor")
    assert rep.config["intermediate_size"] == 96


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))


@pytest.mark.parametrize("calibration,err,msg", [
    (torch.randn(2, 3), ValueError, r"calibration: Sequential fails on batch 0, float32 \(2, 3\) \(RuntimeError: .*\); "
                                    r"give inputs of the shape and dtype its forward takes"),
    (torch.randint(0, 3, (2, 3, 8, 8)), ValueError, r"calibration: Sequential fails on batch 0, int64 \(2, 3, 8, 8\)"),
    ([torch.randn(2, 3, 8, 8), "x"], TypeError, r"calibration\[1\]: expected a batch: a tensor, a tuple of positional "
                                                r"arguments or a dict of keyword arguments, got str"),
])
def test_prune_channels_calibration_the_model_cannot_run(calibration, err, msg):
    model = cnn()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(err, match=msg):
        prune_channels(model, 0.5, calibration, criterion="activation")
    assert model[0].out_channels == 8 and unchanged(model, state)
