"""Model-level pruning: :func:`prune` walks the decoder blocks one at a time.

The procedure of the SparseGPT and Wanda papers:

1. Run the calibration batches through the model until the first block; a forward pre-hook
   on it stores the block's inputs (hidden states plus every extra positional and keyword
   argument: attention masks, position ids/embeddings) and raises a sentinel exception, so
   nothing past the first block runs.
2. For each block: hook its prunable layers, run the stored inputs through it to collect
   statistics (Hessians for SparseGPT, input norms for Wanda), prune every layer, then run
   the inputs through the *pruned* block; those outputs are the next block's inputs.  During
   that pass, forward hooks measure each layer's relative output error against a copy of its
   original weight (:attr:`LayerReport.output_error`).

Only one block's activations (inputs and outputs), statistics and original weights are alive
at a time.

Methods live in :data:`METHODS`; :func:`register_method` adds one (e.g. structured pruning)
as a :class:`PruningMethod` subclass.  Prunable layers: :mod:`.layers`; the calibration
plumbing: :mod:`.calibration`; the report and its error meters: :mod:`.report`.
"""

from __future__ import annotations

import re
import time
from typing import Callable

import torch
from torch import nn

from .calibration import _capture_inputs, _run_block
from .criteria import (ActivationNormAccumulator, check_alpha, magnitude_prune, magnitude_prune_global, ria_prune,
                       ria_scores, wanda_prune, wanda_scores)
from .dsnot import ActivationMomentsAccumulator, dsnot_refine, parse_dsnot
from .experts import ExpertMatrix, is_experts_module, route_all_experts, router_layers
from .layers import _get_weight, _is_conv1d, _set_weight, conv_channels, prunable_layers
from .owl import outlier_ratio, owl_sparsities, parse_owl
from .patterns import Sparsity, parse_sparsity
from .fold import fold_permutations
from .permutation import (check_search_m, find_permutation_with_gain, invert_permutation, parse_permute,
                          search_options)
from .report import LayerReport, PruneReport, _block_error, _OutputError, _progress
from .sparsegpt import HessianAccumulator, sparsegpt_prune, sparsegpt_prune_int4

__all__ = [
    "prune", "find_blocks", "prunable_layers", "PruneReport", "LayerReport", "PruningMethod",
    "METHODS", "register_method",
]

# Attribute paths of the decoder-block list, tried in order (Llama/Mistral/Qwen2/Gemma
# causal LMs, their base models, GPT-2, OPT, GPT-NeoX, multimodal wrappers).
BLOCK_PATHS = (
    "model.layers", "layers", "transformer.h", "h", "model.decoder.layers", "decoder.layers",
    "gpt_neox.layers", "model.language_model.layers", "language_model.model.layers",
)


# ------------------------------------------------------------------ blocks
def _get_attr(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a Hugging Face causal LM (or any model with one ``nn.ModuleList``
    of identical blocks holding prunable layers: the longest list of blocks with Linear layers,
    else the longest with convolutions only, as in a CNN).  Raises ValueError when none is found."""
    for path in BLOCK_PATHS:
        blocks = _get_attr(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return list(blocks)
    best, best_key = None, None
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            kinds = {type(b) for b in mod}
            layers = prunable_layers(mod[0]) if len(kinds) == 1 else {}
            # blocks holding Linear layers first (a transformer's, not an audio model's conv feature
            # extractor), then the longest list
            key = (any(isinstance(m, nn.Linear) or _is_conv1d(m) for m in layers.values()), len(mod))
            if layers and (best_key is None or key > best_key):
                best, best_key = mod, key
    if best is None:
        raise ValueError(
            f"blocks: no decoder-block list found in {type(model).__name__} (tried {', '.join(BLOCK_PATHS)} "
            f"and any nn.ModuleList of identical blocks); pass blocks=[...] explicitly (a CNN whose stages are "
            f"nn.Sequential: every residual block in forward order, e.g. [*model.layer1, *model.layer2, ...])"
        )
    return list(best)


# ------------------------------------------------------------------ methods
class PruningMethod:
    """How one method prunes a block.  Subclass and :func:`register_method` to add one.

    ``needs_calibration``: whether :func:`prune` must have calibration data.
    ``make_stats(name, layer)``: an object with ``attach(module) -> handle`` fed during the
    statistics pass, or None.  ``prune_layer`` returns ``(W_pruned [out, in], mask, loss|None)``.
    ``prune_block`` may be overridden by methods that couple layers (structured pruning).
    ``importance(weight, stats, options)``: the scores ``[out, in]`` the N:M channel-permutation
    search maximizes (``prune(permute=True)``; default ``|W|``); the stats objects then need a
    ``permuted(perm)`` method (both accumulators have one).
    """

    name = "?"
    needs_calibration = True
    #: extra keyword options :func:`prune` accepts for this method (passed on in ``options``)
    option_names: tuple = ()
    #: the comparison groups ``prune(scope=...)`` accepts for an unstructured sparsity, the default
    #: first (a tuple of str); empty: the method takes no ``scope``
    scopes: tuple = ()
    #: why the method takes no scope, for the error message (SparseGPT: per block of columns)
    scope_note: str = ""
    #: True for criteria that only choose a mask (the kept weights keep their values): DSnoT
    #: (``prune(dsnot=...)``) can refine their masks
    mask_only = False
    #: Whole-model methods (structured pruning) set this to a callable
    #: ``(model, sparsity, calibration, batch_size, **options) -> report``; :func:`prune` then
    #: calls it instead of walking the blocks and returns its report.
    prune_model = None

    def make_stats(self, name: str, layer: nn.Module):
        return None

    def check_options(self, options: dict) -> None:
        """Raise ValueError/TypeError for bad values of :attr:`option_names` (before any pruning)."""

    def prune_layer(self, name, layer, weight, stats, spec: Sparsity, options: dict):
        raise NotImplementedError

    def importance(self, weight, stats, options: dict) -> torch.Tensor:
        return weight.detach().float().abs()

    def _prune_permuted(self, name, layer, w, st, spec: Sparsity, options: dict):
        """N:M-prune ``w`` with its input channels permuted first: search ``perm`` on
        :meth:`importance`, prune ``w[:, perm]`` (stats permuted alike), map the result back to
        the original column order.  Returns ``(w_new, mask, loss, perm, gain)``, ``gain`` the
        relative rise of the N:M-kept importance over the identity order."""
        score = self.importance(w, st, options)
        perm, gain = find_permutation_with_gain(score, spec.n, spec.m, **search_options(options["_permute"]))
        w_p, mask_p, loss, swaps = self._prune_one(name, layer, w[:, perm],
                                                   None if st is None else st.permuted(perm), spec, options)
        inv = invert_permutation(perm)
        return w_p[:, inv], mask_p[:, inv], loss, perm, gain, swaps

    def _prune_one(self, name, layer, w, st, spec: Sparsity, options: dict):
        """:meth:`prune_layer`, then DSnoT's mask refinement when ``prune(dsnot=...)`` asks for it
        (and ``name`` does not match its ``skip``).  Returns ``(w_new, mask, loss, swaps)``."""
        w_new, mask, loss = self.prune_layer(name, layer, w, st, spec, options)
        opts = options.get("_dsnot")
        if opts is None or (opts.get("skip") and re.search(opts["skip"], name)):
            return w_new, mask, loss, None
        # the paper's drop order: Wanda's score for unstructured rows, the criterion's own for N:M
        imp = self.importance(w, st, options) if spec.is_nm else wanda_scores(w, st.norm_sq.to(w.device))
        new = dsnot_refine(w, mask, st.mean, st.var, imp, spec, max_cycles=opts["max_cycles"],
                           threshold=opts["threshold"], var_power=opts["var_power"])
        swaps = int((new & ~mask).sum())
        return w * new.to(w.dtype), new, loss, swaps

    def prune_block(self, block_index, block, layers: dict, stats: dict, spec: Sparsity, options: dict):
        reports = []
        keep = bool(options.get("_keep_masks"))
        for name, layer in layers.items():
            t0 = time.perf_counter()
            w = _get_weight(layer)
            perm = gain = None
            st = stats.get(name)
            tokens = getattr(st, "nsamples", None)
            if isinstance(layer, ExpertMatrix) and tokens == 0:
                # an expert no calibration token reached: its statistics are all zero (SparseGPT would
                # zero every column, Wanda rank nothing); prune it by |W| instead (prune's notes list it)
                w_new, mask = magnitude_prune(w, spec, scope="layer")
                loss = swaps = None
            elif options.get("_permute") is not None:
                w_new, mask, loss, perm, gain, swaps = self._prune_permuted(name, layer, w, stats.get(name), spec,
                                                                            options)
            else:
                w_new, mask, loss, swaps = self._prune_one(name, layer, w, st, spec, options)
            _set_weight(layer, w_new)
            reports.append(LayerReport(
                block=block_index, name=name, shape=tuple(w.shape),
                sparsity=1.0 - mask.float().mean().item(), loss=loss,
                seconds=time.perf_counter() - t0, mask=mask if keep else None,
                perm=perm, permutation_gain=gain, dsnot_swaps=swaps,
                calibration_tokens=tokens if isinstance(layer, ExpertMatrix) else None,
            ))
        return reports


class SparseGPTMethod(PruningMethod):
    name = "sparsegpt"
    scope_note = "it chooses its mask per block of columns"

    def make_stats(self, name, layer):
        return HessianAccumulator(_get_weight(layer).shape[1], device=layer.weight.device)

    def importance(self, weight, stats, options):
        # diag(H) = 2/n sum x_j^2: Wanda's score up to a constant factor
        return wanda_scores(weight, torch.diagonal(stats.H).clamp_min(0).to(weight.device))

    def prune_layer(self, name, layer, weight, stats, spec, options):
        if options.get("_int4"):
            w_q, mask, loss, codes, scales = sparsegpt_prune_int4(
                weight, stats.H, spec, options["_int4"], blocksize=options.get("blocksize", 128),
                percdamp=options.get("percdamp", 0.01), backend=options.get("backend"), name=name)
            options["_int4_parts"][name] = (codes, scales)  # for convert: SparseLinearInt4 stores them as they are
            return w_q, mask, loss
        return sparsegpt_prune(
            weight, stats.H, spec, blocksize=options.get("blocksize", 128),
            percdamp=options.get("percdamp", 0.01), backend=options.get("backend"), name=name,
        )


class WandaMethod(PruningMethod):
    name = "wanda"
    mask_only = True
    scopes = ("row", "layer")

    def make_stats(self, name, layer):
        return ActivationNormAccumulator(_get_weight(layer).shape[1], device=layer.weight.device)

    def importance(self, weight, stats, options):
        return wanda_scores(weight, stats.norm_sq.to(weight.device))

    def prune_layer(self, name, layer, weight, stats, spec, options):
        w, mask = wanda_prune(weight, stats.norm_sq.to(weight.device), spec, scope=options.get("scope") or "row")
        return w, mask, None


class RIAMethod(PruningMethod):
    """RIA (:func:`ria_prune`): Wanda's statistics, relative-importance scores; option ``alpha``."""

    name = "ria"
    option_names = ("alpha",)
    mask_only = True
    scopes = ("row", "layer")

    def check_options(self, options):
        check_alpha(options.get("alpha", 0.5))

    def make_stats(self, name, layer):
        return ActivationNormAccumulator(_get_weight(layer).shape[1], device=layer.weight.device)

    def importance(self, weight, stats, options):
        return ria_scores(weight, stats.norm_sq.to(weight.device), options.get("alpha", 0.5))

    def prune_layer(self, name, layer, weight, stats, spec, options):
        w, mask = ria_prune(weight, stats.norm_sq.to(weight.device), spec, alpha=options.get("alpha", 0.5),
                            scope=options.get("scope") or "row")
        return w, mask, None


class MagnitudeMethod(PruningMethod):
    name = "magnitude"
    mask_only = True
    scopes = ("layer", "row", "global")
    needs_calibration = False

    def prune_layer(self, name, layer, weight, stats, spec, options):
        scope = options.get("scope") or "layer"
        if scope == "global":
            keep = options["_global_masks"][id(layer)]
            return weight * keep.to(weight.dtype), keep, None
        w, mask = magnitude_prune(weight, spec, scope=scope)
        return w, mask, None


class StructuredMethod(PruningMethod):
    """Remove whole FFN channels, KV head groups and decoder layers (:mod:`sparse_kernels.structured`).

    Options: ``criterion`` (magnitude | activation | taylor), ``heads``, ``layers``, ``round_to``.
    The model shrinks in place (same object); the report is a ``StructuredReport``.
    """

    name = "structured"
    needs_calibration = False
    option_names = ("criterion", "heads", "layers", "round_to")

    def prune_model(self, model, sparsity, calibration, batch_size=4, **options):
        from ..structured import structured_prune

        _, report = structured_prune(model, sparsity, calibration, batch_size=batch_size, **options)
        return report


METHODS: dict[str, PruningMethod] = {}


def register_method(name: str, method: PruningMethod) -> None:
    """Make ``prune(model, method=name)`` use ``method`` (replaces a previous registration)."""
    if not isinstance(method, PruningMethod):
        raise TypeError(f"method: expected a PruningMethod instance, got {type(method).__name__}")
    if not isinstance(method.scopes, tuple) or not all(isinstance(x, str) for x in method.scopes):
        raise TypeError(f"method: {type(method).__name__}.scopes must be a tuple of str (the default first), "
                        f"got {method.scopes!r}")
    METHODS[name] = method


for _m in (SparseGPTMethod(), WandaMethod(), RIAMethod(), MagnitudeMethod(), StructuredMethod()):
    register_method(_m.name, _m)


def _owl_ratios(blocks, inputs, layer_filter, device, m: float, all_experts: bool = False) -> list[float]:
    """OWL's pre-pass: the calibration through the *dense* blocks, one at a time, each block's
    Wanda scores ``|W| * ||X_j||`` over all its prunable layers reduced to its outlier ratio
    (:func:`sparse_kernels.pruning.owl.outlier_ratio`).  ``inputs`` is left as it was."""
    ratios = []
    for block in blocks:
        home = next(block.parameters()).device if any(True for _ in block.parameters()) else None
        if device is not None:
            block.to(device)
        layers = prunable_layers(block, layer_filter)
        stats, out = _collect_stats(WandaMethod(), block, layers, inputs, all_experts=all_experts)

        def scores(layers=layers, stats=stats):  # one layer's scores alive at a time
            for name, layer in layers.items():
                w = _get_weight(layer)
                yield w.float().abs() * stats[name].norm_sq.to(w.device).float().sqrt()

        ratios.append(outlier_ratio(scores, m))
        del stats
        inputs = [(o, args, kw) for o, (_, args, kw) in zip(out, inputs)]
        if device is not None and home is not None:
            block.to(home)
    return ratios


def _collect_stats(meth: PruningMethod, block, layers: dict, inputs, moments: bool = False, all_experts: bool = False):
    """Run ``inputs`` through ``block`` with each layer's statistics hooked; returns
    ``(stats, dense_out)``.  ``moments``: collect :class:`ActivationMomentsAccumulator` for every
    layer instead (DSnoT; it holds Wanda's statistic too).  ``all_experts``: the block's
    mixture-of-experts modules send every token to every expert for this pass (their output
    unchanged: :mod:`.experts`).  A function of its own so that no loop variable keeps a
    statistics object of this block alive into the next one."""
    stats, handles = {}, []
    try:
        for name, layer in layers.items():
            st = (ActivationMomentsAccumulator(_get_weight(layer).shape[1], device=layer.weight.device) if moments
                  else meth.make_stats(name, layer))
            if st is not None:
                stats[name] = st
                handles.append(st.attach(layer))
        experts = [m for m in block.modules() if is_experts_module(m)] if all_experts else []
        with route_all_experts(experts):
            return stats, _run_block(block, inputs)
    finally:
        for h in handles:
            h.remove()



# ------------------------------------------------------------------ prune helpers
def _convert_block(block: nn.Module, layers: dict, masks: dict, spec: Sparsity, unstructured=None,
                   perms: dict | None = None, int4_parts: dict | None = None) -> None:
    """Swap each pruned layer for a SparseLinear: packed 2:4 when the pattern fits 2:4
    (n <= 2 of every 4; with its input permutation from ``perms``, if any), otherwise
    ``unstructured``: None for a masked layer (weight + bit-packed mask, trainable),
    ``"bitmask"`` for the compressed one (nonzeros + bitmask).  Layers in ``int4_parts``
    (``prune(int4=...)``: their codes and scales, in the pruned, possibly permuted, column order)
    become SparseLinearInt4."""
    from ..nn import SparseLinear, SparseLinearInt4

    pattern = "2:4" if spec.m == 4 and spec.n <= 2 else unstructured
    for name, layer in layers.items():
        if isinstance(layer, ExpertMatrix):  # stays in its 3-D parameter, pruned in place
            continue
        if _is_conv1d(layer):
            lin = nn.Linear(layer.weight.shape[0], layer.weight.shape[1], bias=layer.bias is not None,
                            device=layer.weight.device, dtype=layer.weight.dtype)
            lin.weight.data.copy_(layer.weight.data.t())
            if layer.bias is not None:
                lin.bias.data.copy_(layer.bias.data)
            layer = lin
        perm = (perms or {}).get(name) if pattern == "2:4" else None
        if name in (int4_parts or {}):
            codes, scales = int4_parts[name]
            new = SparseLinearInt4.from_codes(codes, scales, None if layer.bias is None else layer.bias.detach(),
                                              in_perm=perm)
        elif perm is not None:
            new = SparseLinear.from_dense(layer, pattern=pattern, mask=masks[name], in_perm=perm)
        else:
            new = SparseLinear.from_dense(layer, pattern=pattern, mask=masks[name])
        parent_name, _, child = name.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        setattr(parent, child, new)


def _convert_experts(block: nn.Module, layers: dict, int4_parts: dict | None = None) -> tuple[int, list[str]]:
    """Replace each experts module of ``block`` whose every expert matrix is in ``layers`` (pruned
    2:4) by a :class:`sparse_kernels.nn.SparseExperts`, or with ``int4_parts`` (``prune(int4=...)``:
    each matrix's codes and scales) by a :class:`sparse_kernels.nn.SparseExpertsInt4` holding them
    as they are.  Returns how many, and the names of those left dense (an int4 module with a
    matrix that has no codes: no calibration token reached it)."""
    from ..nn import SparseExperts, SparseExpertsInt4
    from .experts import expert_matrices, expert_params, out_in

    names = {id(layer): name for name, layer in layers.items()}
    done, left = 0, []
    for name, mod in list(block.named_modules()):
        mats = expert_matrices(mod)
        if not (name and mats and all(id(mat) in names for mat in mats.values())):  # (a block cannot replace itself)
            continue
        if int4_parts is None:
            block.set_submodule(name, SparseExperts.from_experts(mod))
            done += 1
            continue
        if not all(names[id(mat)] in int4_parts for mat in mats.values()):
            left.append(name)
            continue
        codes, scales = {}, {}
        c0, s0 = int4_parts[names[id(next(iter(mats.values())))]]
        group = c0.shape[1] // s0.shape[1]
        for pname, p in expert_params(mod).items():
            e, out_f, in_f = out_in(mod, p).shape
            groups = in_f // group
            codes[pname] = torch.zeros(e, out_f, in_f, dtype=torch.int8, device=p.device)
            scales[pname] = torch.ones(e, out_f, groups, dtype=p.dtype, device=p.device)
        for mat in mats.values():  # each matrix's rows: the whole expert, or its gate / up rows
            c, s = int4_parts[names[id(mat)]]
            rows = mat.rows(codes[mat.param].shape[1])
            codes[mat.param][mat.index, rows] = c
            scales[mat.param][mat.index, rows] = s
        block.set_submodule(name, SparseExpertsInt4.from_codes(mod, codes, scales))
        done += 1
    return done, left


def _experts_notes(report: PruneReport, n_experts: int, all_experts: bool, convert, converted: int, left: list,
                   int4) -> list[str]:
    """What :func:`prune` says about the ``n_experts`` expert matrices it pruned."""
    rows = [r for r in report.layers if r.calibration_tokens is not None]
    notes = [f"{n_experts} expert matrices pruned in place (3-D parameters)"]
    if rows:
        toks = sorted(r.calibration_tokens for r in rows)
        notes[0] += (f"; calibration tokens per expert matrix: min {toks[0]}, median {toks[len(toks) // 2]}, "
                     f"max {toks[-1]}" + (" (every token sent to every expert)" if all_experts
                                          else " (routed tokens only)"))
        starved = [f"{r.block}.{r.name}" for r in rows if r.calibration_tokens == 0]
        if starved:
            notes.append(f"{len(starved)} expert matrices got no calibration token and were pruned by magnitude "
                         f"(not quantized, with int4=): " + ", ".join(starved[:8])
                         + (" ..." if len(starved) > 8 else "")
                         + ("" if all_experts else " (calibrate_all_experts=True sends every token to every expert)"))
    kind = "SparseExperts (2:4 values + meta per expert)" if int4 is None else \
        f"SparseExpertsInt4 (2:4 int4 codes + meta + scales per expert, groups of {int4})"
    if converted:
        notes.append(f"convert: {converted} experts modules became {kind}")
    if left:
        notes.append(f"convert: {len(left)} experts modules stay dense-shaped, some of their matrices got no "
                     f"calibration token and no int4 codes: " + ", ".join(left[:4]) + (" ..." if len(left) > 4 else ""))
    elif convert and not converted:
        notes.append("convert: the expert matrices stay dense-shaped in their 3-D parameters (SparseExperts holds "
                     "2:4 experts); sparse_kernels.save_sparse stores them compressed")
    return notes


def _check_conv(where: str, layer, spec: Sparsity, permute: bool, int4, convert) -> None:
    """What :func:`prune` cannot do with a convolution: raise before anything is pruned."""
    kind = type(layer).__name__
    skip = "leave it out with layer_filter"
    if spec.is_nm and layer.in_channels % spec.m:
        raise ValueError(f"{where}: a {kind} with {layer.in_channels} input channels cannot take '{spec}': its N:M "
                         f"groups run along input channels (channels-last, per kernel position), so M={spec.m} must "
                         f"divide them; {skip} or use an unstructured sparsity")
    for flag, what in ((permute, "permute"), (int4 is not None, "int4"), (bool(convert), "convert")):
        if flag:
            raise ValueError(f"{what}: {where} is a {kind}; {what} applies to Linear layers only (convolutions are "
                             f"pruned in place, their weights keep their shape); {skip}")


# ------------------------------------------------------------------ prune
@torch.no_grad()
def prune(
    model: nn.Module,
    method: str = "sparsegpt",
    sparsity=0.5,
    calibration=None,
    blocks: list | None = None,
    *,
    batch_size: int = 1,
    blocksize: int = 128,
    percdamp: float = 0.01,
    scope: str | None = None,
    layer_filter: Callable[[str, nn.Module], bool] | None = None,
    device=None,
    convert: bool | str = False,
    progress: bool = True,
    backend: str | None = None,
    owl=None,
    permute=False,
    dsnot=False,
    int4: int | None = None,
    calibrate_all_experts: bool = True,
    **method_options,
) -> PruneReport:
    """Prune ``model`` in place, block by block; returns a :class:`PruneReport`.

    Args:
        model: a Hugging Face causal LM (Llama, Mistral, Qwen2, Gemma, GPT-2, OPT, ...) or any
            ``nn.Module`` (then give ``blocks``), a vision model included.  The prunable layers
            are ``nn.Linear``, GPT-2's ``Conv1D`` and ``nn.Conv1d``/``nn.Conv2d`` with
            ``groups=1``: a convolution is pruned as its channels-last weight ``[out, kh*kw*C]``
            against its unfolded input patches (N:M groups along input channels, which M must
            divide; :mod:`sparse_kernels.pruning.layers`), in place, keeping its shape.
        method: a key of :data:`METHODS`: ``"sparsegpt"``, ``"wanda"``, ``"ria"``, ``"magnitude"``.
        sparsity: float in (0, 1) or ``"N:M"`` (N kept of every M along in_features).
        calibration: token ids ``LongTensor [n, seqlen]`` (split into ``batch_size`` rows; for a
            model without a ``config.vocab_size``, any tensor, e.g. images ``[n, C, H, W]``), or
            an iterable of batches (tensor: ``model(batch)``; tuple: ``model(*batch)``; dict:
            ``model(**batch)``; a bare dict is refused: wrap it in a list).  A language model's
            token ids (the tensor, a tuple's first element, a dict's ``input_ids``) must lie in
            ``[0, config.vocab_size)``.  Required for sparsegpt and wanda; optional for magnitude
            (with it, the report has block output errors).
        blocks: the sequence of blocks, in forward order; found by :func:`find_blocks` if None.
            Each block is called as ``block(hidden, *args, **kwargs)`` with what the model
            passed to the first block, and must return the hidden states (or a tuple led by them).
        blocksize, percdamp, backend: SparseGPT options (:func:`sparsegpt_prune`).
        scope: the comparison group of an unstructured sparsity. Magnitude: ``"layer"``
            (default), ``"row"`` or ``"global"`` (one threshold across all prunable layers of all
            blocks); Wanda and RIA: ``"row"`` (default, the papers') or ``"layer"``; SparseGPT
            takes none (it chooses per block of columns).  None: the method's default; the only
            value an ``"N:M"`` sparsity takes (each group of M is its own comparison group).
        layer_filter: ``f(name, module) -> bool`` selecting layers inside a block (default: all);
            one that selects no layer raises ValueError before the calibration runs.
        device: where to process each block (moved there and back); None: leave it in place.
        convert: replace pruned layers with ``sparse_kernels.nn.SparseLinear``: ``True`` gives
            packed 2:4 layers for 2:4-compatible patterns and masked ones (dense weight + a
            bit-packed mask: trainable, but more bytes than dense) otherwise; ``"bitmask"``
            stores the other patterns compressed instead (nonzeros + 1 bit per weight, for
            inference: :func:`sparse_kernels.bitmask_linear`).
        progress: show a progress bar (tqdm if installed, else a line per block on stderr).
        owl: outlier-weighted layerwise sparsity (:mod:`sparse_kernels.pruning.owl`): ``True``
            for the paper's ``m=5, lmbda=0.08`` or a dict overriding them.  Blocks with more
            activation outliers get a lower sparsity, the mean stays ``sparsity``.  Needs
            calibration and an unstructured sparsity; costs one extra pass of the calibration
            through the dense blocks.
        permute: N:M channel permutation (:mod:`sparse_kernels.pruning.permutation`): ``True``, or a
            dict of :func:`~sparse_kernels.pruning.permutation.find_permutation` options
            (``rounds``, ``patience``, ``seed``, ``max_seconds``) and ``fold`` (default True).  Before each layer is pruned,
            its input channels are permuted to keep more of the method's importance (|W| for
            magnitude, |W| * ||X_j|| for Wanda and SparseGPT, RIA's score for RIA) under the
            N:M pattern; the layer is pruned in that order and its weight mapped back, so the
            pruned model computes the same function in the original order (its weights are N:M
            only after the permutation).  With ``convert``, 2:4 layers become SparseLinear layers
            holding the permutation (``in_perm``: the input is gathered before the sparse
            kernel); with ``fold`` the MLP's down projection instead gets its input already
            permuted from the layers before it (:func:`sparse_kernels.pruning.fold.fold_permutations`:
            no gather; listed in the report's ``folded_permutations``).  Each layer's ``permutation_gain`` reports the relative rise of kept
            importance and ``perm`` the permutation (``W_pruned[:, perm]`` is N:M; without
            ``convert``, ``SparseLinear.from_dense(layer, "2:4", in_perm=perm)`` builds the
            layer later).  Needs an ``"N:M"`` sparsity with ``M <= 16``.
        dsnot: DSnoT's training-free mask refinement (:mod:`sparse_kernels.pruning.dsnot`) after
            each layer's criterion: ``True`` (the paper's ``max_cycles=50, threshold=0.1,
            var_power=1``) or a dict overriding them, plus ``skip`` (a regex of layer names inside
            a block to leave unrefined).  Swaps pruned and kept weights of a row (of an N:M group)
            to cancel the row's expected output shift; same sparsity.  For the mask-only
            criteria (magnitude, wanda, ria); needs calibration.  ``LayerReport.dsnot_swaps``
            counts the swaps.
        int4: SparseGPT only: quantize the kept weights to int4 in groups of ``int4`` input
            columns inside SparseGPT's column loop, so its updates compensate the rounding too
            (joint sparsification + quantization, GPTQ-style groups:
            :func:`~sparse_kernels.pruning.sparsegpt.sparsegpt_prune_int4`; its column loop is the
            ``sparsegpt_block_update_int4`` op, run on ``backend``).  A multiple of 16 dividing
            ``blocksize`` and every layer's ``in_features``.  With ``convert`` (needs ``"2:4"``), the layers become
            :class:`sparse_kernels.nn.SparseLinearInt4` (experts modules
            :class:`sparse_kernels.nn.SparseExpertsInt4`) holding exactly those codes and scales.
        method_options: options of a method: ``alpha`` for ``"ria"`` (default 0.5); for whole-model
            methods, e.g. ``"structured"``:
            ``criterion="activation", heads=0.25, layers=2, round_to=64`` (then ``sparsity`` is the
            fraction of each FFN's channels to remove and the model shrinks in place).  Whole-model
            methods take ``batch_size`` and none of the block-by-block options (``blocks``,
            ``layer_filter``, ``device``, ``int4``, ``scope``, ...: ValueError).

        calibrate_all_experts: mixture-of-experts models (transformers' 3-D expert weights: each
            expert's matrix is pruned as a layer, :mod:`sparse_kernels.pruning.experts`).  True
            (default, as llm-compressor calibrates): every calibration token reaches every expert
            in a separate statistics call whose output is discarded (the block's output is the
            routed one); False: each expert sees only its routed tokens, and an expert that gets
            none is pruned by magnitude (listed in the report's notes).  Expert matrices are
            pruned in place; with ``convert=True`` and a 2:4 pattern each experts module whose
            experts were all pruned becomes a :class:`sparse_kernels.nn.SparseExperts` (2:4 values
            + meta per expert), or with ``int4`` a :class:`sparse_kernels.nn.SparseExpertsInt4`
            (SparseGPT's codes and scales); other patterns leave them in their 3-D parameters.
            ``permute`` refuses them.

    Returns a :class:`PruneReport`: per layer the sparsity, SparseGPT's loss (its own
    objective; None for other methods), the relative output error
    ``||X W^T - X W_pruned^T|| / ||X W^T||`` on the layer's calibration inputs (every method;
    None without calibration) and the time; per block the relative output error.  With
    ``device=``, those sums stay on the device and are read once per layer.

    Raises ValueError/TypeError for an unknown method, a bad sparsity, missing or malformed
    calibration, no blocks found, no layer selected, an option the method does not take.
    """
    if method not in METHODS:
        raise ValueError(f"method: got {method!r}, expected one of {', '.join(sorted(METHODS))}")
    meth = METHODS[method]
    unknown = sorted(set(method_options) - set(meth.option_names))
    if unknown:
        raise TypeError(f"prune: method {method!r} takes no options {unknown}"
                        + (f" (it takes {', '.join(meth.option_names)})" if meth.option_names else ""))
    if meth.prune_model is not None:
        block_options = (("owl", bool(owl)), ("permute", bool(permute)), ("dsnot", bool(dsnot)),
                         ("convert", bool(convert)), ("scope", scope is not None), ("blocks", blocks is not None),
                         ("layer_filter", layer_filter is not None), ("device", device is not None),
                         ("blocksize", blocksize != 128), ("percdamp", percdamp != 0.01),
                         ("backend", backend is not None), ("int4", int4 is not None),
                         ("calibrate_all_experts", calibrate_all_experts is not True))
        given = [k for k, v in block_options if v]
        if given:
            raise ValueError(f"prune: method {method!r} prunes the whole model its own way and takes none of "
                             f"{', '.join(k for k, _ in block_options)}; got {', '.join(given)}")
        return meth.prune_model(model, sparsity, calibration, batch_size=batch_size, **method_options)
    meth.check_options(method_options)
    if scope is not None and scope not in meth.scopes:
        raise ValueError(f"scope: method {method!r} " + (f"takes {', '.join(map(repr, meth.scopes))}" if meth.scopes
                         else "takes no scope" + (f" ({meth.scope_note})" if meth.scope_note else ""))
                         + f", got {scope!r}")
    spec = parse_sparsity(sparsity)
    if scope is not None and spec.is_nm:
        raise ValueError(f"scope={scope!r} chooses the comparison group of an unstructured sparsity; '{spec}' keeps "
                         f"{spec.n} of every group of {spec.m} whatever the scope (drop scope, or give a fraction)")
    scope = scope if scope is not None else (meth.scopes[0] if meth.scopes else None)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size: got {batch_size!r}, expected a positive int")
    if calibration is None and meth.needs_calibration:
        raise ValueError(f"calibration: method {method!r} needs calibration data (token ids [n, seqlen] or batches)")
    blocks = find_blocks(model) if blocks is None else list(blocks)
    if not blocks or not all(isinstance(b, nn.Module) for b in blocks):
        raise TypeError("blocks: expected a non-empty list of nn.Module")
    owl_opts = parse_owl(owl)
    if owl_opts is not None:
        if spec.is_nm:
            raise ValueError(f"owl: needs an unstructured sparsity (a fraction); '{spec}' fixes every group's sparsity")
        if calibration is None:
            raise ValueError("owl: needs calibration data (the outlier ratios come from activations)")
        if method == "magnitude" and scope == "global":
            raise ValueError("owl: cannot be combined with scope='global' (one threshold across all blocks)")
    perm_opts = parse_permute(permute)
    if perm_opts is not None:
        if not spec.is_nm:
            raise ValueError(f"permute: needs an 'N:M' sparsity (channel permutation rearranges the groups of M), "
                             f"got {spec}")
        check_search_m(spec.m, "permute")
    dsnot_opts = parse_dsnot(dsnot)
    if dsnot_opts is not None:
        if not meth.mask_only:
            raise ValueError(f"dsnot: refines the masks of criteria that keep the kept weights' values (magnitude, "
                             f"wanda, ria); method {method!r} updates them")
        if calibration is None:
            raise ValueError("dsnot: needs calibration data (it uses the mean and variance of each layer's inputs)")
    if not (isinstance(convert, bool) or convert == "bitmask"):
        raise ValueError(f"convert: got {convert!r}, expected True, False or 'bitmask'")
    if int4 is not None:
        if method != "sparsegpt":
            raise ValueError(f"int4: joint quantization runs inside SparseGPT's column loop; method {method!r} has none "
                             f"(round a 2:4 model afterwards with sparse_kernels.quantize_int4)")
        if isinstance(int4, bool) or not isinstance(int4, int) or int4 <= 0 or int4 % 16 or blocksize % int4:
            raise ValueError(f"int4: got {int4!r}; the group size must be a positive multiple of 16 dividing "
                             f"blocksize={blocksize}")
        if convert and (convert == "bitmask" or spec.m != 4 or spec.n > 2):
            raise ValueError(f"int4: convert builds 2:4 int4 layers (SparseLinearInt4): it needs sparsity='2:4' and "
                             f"convert=True, got {spec} and convert={convert!r}")
    options = dict(blocksize=blocksize, percdamp=percdamp, backend=backend, scope=scope, _keep_masks=bool(convert),
                   _permute=perm_opts, _dsnot=dsnot_opts, _int4=int4, _int4_parts={}, **method_options)
    if not isinstance(calibrate_all_experts, bool):
        raise TypeError(f"calibrate_all_experts: expected a bool, got {type(calibrate_all_experts).__name__}")
    has_conv = False  # a convolution among the layers to prune (for the BatchNorm note at the end)
    n_experts = experts_converted = 0  # expert matrices among them; experts modules made SparseExperts
    experts_left = []  # experts modules left dense by convert (int4: a matrix without codes)
    routers = [f"{bi}.{n}" for bi, b in enumerate(blocks) for n in sorted(router_layers(b))]
    if layer_filter is not None and not callable(layer_filter):
        raise TypeError(f"layer_filter: expected a callable f(name, module) -> bool, "
                        f"got {type(layer_filter).__name__}")
    n_selected = 0
    for bi, block in enumerate(blocks):  # check every layer before pruning any
        for name, layer in prunable_layers(block, layer_filter).items():
            n_selected += 1
            where = f"blocks[{bi}].{name}" if name else f"blocks[{bi}]"
            if isinstance(layer, ExpertMatrix):
                n_experts += 1
                if perm_opts is not None:
                    raise ValueError(f"permute: {where} is an expert's matrix inside a 3-D parameter, which cannot hold "
                                     f"an input permutation (there is no sparse experts layer); prune without "
                                     f"permute, or leave the experts out with layer_filter")
            if conv_channels(layer) is not None:
                has_conv = True
                _check_conv(where, layer, spec, perm_opts is not None, int4, convert)
            spec.check_columns(where, _get_weight(layer).shape[1])
            if int4 is not None and _get_weight(layer).shape[1] % int4:
                raise ValueError(f"int4: group size {int4} does not divide {where}'s "
                                 f"{_get_weight(layer).shape[1]} input features")
    if not n_selected:
        n_all = sum(len(prunable_layers(b)) for b in blocks)
        raise ValueError(f"layer_filter: selected none of the {n_all} prunable layers in the {len(blocks)} blocks; "
                         f"nothing to prune" if layer_filter is not None and n_all else
                         f"blocks: the {len(blocks)} blocks hold no prunable layer (nn.Linear, GPT-2 Conv1D, "
                         f"nn.Conv1d/nn.Conv2d with groups=1, mixture-of-experts matrices); nothing to prune")

    t_start = time.perf_counter()
    report = PruneReport(method=method, sparsity=str(spec) + (" (OWL)" if owl_opts is not None else "")
                         + (" (permuted)" if perm_opts is not None else "")
                         + (" (DSnoT)" if dsnot_opts is not None else "")
                         + (f" (int4 g{int4})" if int4 is not None else ""))
    was_training = model.training
    model.eval()
    hf_cache = getattr(getattr(model, "config", None), "use_cache", None)
    if hf_cache is not None:
        model.config.use_cache = False
    try:
        if method == "magnitude" and scope == "global":
            all_layers = [l for b in blocks for l in prunable_layers(b, layer_filter).values()]
            res = magnitude_prune_global([_get_weight(l) for l in all_layers], spec)
            options["_global_masks"] = {id(l): k for l, (_, k) in zip(all_layers, res)}

        inputs = None
        if calibration is not None:
            inputs = _capture_inputs(model, blocks[0], calibration, batch_size, device)
        block_specs = [spec] * len(blocks)
        if owl_opts is not None:
            ratios = _owl_ratios(blocks, inputs, layer_filter, device, owl_opts["m"], calibrate_all_experts)
            targets = owl_sparsities(ratios, spec.ratio, owl_opts["lmbda"])
            block_specs = [parse_sparsity(t) for t in targets]
            report.owl = dict(owl_opts, outlier_ratio=ratios, block_sparsity=targets)

        bar = _progress(len(blocks), f"prune ({method}, {spec})", progress)
        for bi, block in enumerate(blocks):
            home = next(block.parameters()).device if any(True for _ in block.parameters()) else None
            if device is not None:
                block.to(device)
            layers = prunable_layers(block, layer_filter)
            stats = {}
            dense_out = None
            if inputs is not None:
                stats, dense_out = _collect_stats(meth, block, layers, inputs, moments=dsnot_opts is not None,
                                                  all_experts=calibrate_all_experts)
            # this block's original weights, for the per-layer output error (freed below)
            meters = {name: _OutputError(_get_weight(layer).detach().clone())
                      for name, layer in layers.items()} if inputs is not None else {}
            layer_reports = meth.prune_block(bi, block, layers, stats, block_specs[bi], options)
            del stats
            err = None
            if inputs is not None:
                handles = [layers[name].register_forward_hook(mt.hook, with_kwargs=True) for name, mt in meters.items()]
                try:
                    pruned_out = _run_block(block, inputs)
                finally:
                    for h in handles:
                        h.remove()
                err = _block_error(pruned_out, dense_out)
                inputs = [(o, args, kw) for o, (_, args, kw) in zip(pruned_out, inputs)]
                del dense_out, pruned_out
                for r in layer_reports:
                    if isinstance(r, LayerReport) and r.name in meters:
                        r.output_error = meters[r.name].value()
            del meters
            if convert:
                _convert_block(block, layers, {r.name: r.mask for r in layer_reports}, block_specs[bi],
                               "bitmask" if convert == "bitmask" else None,
                               {r.name: r.perm for r in layer_reports if getattr(r, "perm", None) is not None},
                               options["_int4_parts"])
                for r in layer_reports:
                    r.mask = None
                if block_specs[bi].m == 4 and block_specs[bi].n <= 2 and convert is True:
                    done, left = _convert_experts(block, layers, None if int4 is None else options["_int4_parts"])
                    experts_converted += done
                    experts_left += [f"{bi}.{n}" for n in left]
                if perm_opts is not None and perm_opts.get("fold", True):
                    report.folded_permutations += [f"{bi}.{n.split('.', 1)[1]}" for n in fold_permutations([block])]
            options["_int4_parts"].clear()
            if device is not None and home is not None:
                block.to(home)
            report.layers.extend(layer_reports)
            report.block_output_error.append(err)
            bar.update(1)
        bar.close()
    finally:
        model.train(was_training)
        if hf_cache is not None:
            model.config.use_cache = hf_cache
    report.seconds = time.perf_counter() - t_start
    if n_experts:
        report.notes += _experts_notes(report, n_experts, calibrate_all_experts, convert, experts_converted,
                                       experts_left, int4)
    if routers:
        report.notes.append(f"{len(routers)} MoE routing layers left dense: " + ", ".join(routers[:4])
                            + (" ..." if len(routers) > 4 else ""))
    if has_conv:
        from ..training.batchnorm import tracking_batchnorms

        bns = tracking_batchnorms(model)
        if bns:
            report.notes.append(f"the model's BatchNorm layers ({len(bns)}) keep the dense model's running "
                                f"statistics; re-estimate them for the pruned weights: sparse_kernels.training."
                                f"recalibrate_batchnorm(model, calibration) (docs/PRUNING.md, 'BatchNorm after "
                                f"pruning')")
    return report
