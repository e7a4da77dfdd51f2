"""Structured pruning: remove whole units and return a smaller *dense* model with a matching config.

Units, per decoder layer of a Hugging Face causal LM:

* **FFN channels**: intermediate channel j of Llama-style MLPs (``gate_proj``/``up_proj`` row j,
  ``down_proj`` column j; Llama, Mistral, Qwen2/3, Gemma) or GPT-2's ``mlp.c_fc``/``mlp.c_proj``
  (``Conv1D``, weight ``[in, out]``). ``config.intermediate_size`` (GPT-2: ``n_inner``) shrinks.
* **Attention heads**, by whole key/value groups so grouped-query attention stays consistent:
  removing KV head k removes its ``g = num_attention_heads / num_key_value_heads`` query heads
  ``k*g .. k*g+g-1`` (``q_proj`` rows, ``k_proj``/``v_proj`` rows, ``o_proj`` columns).
  ``num_attention_heads``/``num_key_value_heads`` shrink and ``head_dim`` is written into the
  config. GPT-2 (``c_attn`` = [q | k | v] columns) has g = 1; its config cannot express a
  ``head_dim`` other than ``n_embd / n_head``, so a head-pruned GPT-2 works in memory but
  ``from_pretrained`` cannot rebuild it from the saved config.
* **Decoder layers**: removed from the layer list; ``num_hidden_layers`` (``n_layer``),
  ``layer_types`` and every attention's ``layer_idx`` (KV-cache slot) are renumbered.

The same count of channels/heads is removed in every layer, so the config stays uniform.

Importance (lowest goes first; ties go to the lower index), ``criterion=``:

* ``"magnitude"``: sum of squared weights tied to the unit (channel: gate/up row + down column;
  head group: its q/k/v rows + o columns; layer: mean squared weight of all its parameters);
* ``"activation"``: on calibration data, the squared L2 norm over tokens of the unit's output
  before the output projection (channel: input of ``down_proj``; head: its slice of the input
  of ``o_proj``); layers by block influence (ShortGPT): ``1 - mean cos(h_in, h_out)``;
* ``"taylor"``: first-order Taylor, ``|sum over the unit's weights of w * dL/dw|`` with L the
  causal-LM loss summed over calibration batches.

The pruned model computes exactly what the original computes with the same units masked out
(``down_proj`` columns, ``o_proj`` head columns zeroed, removed layers skipped), up to float
summation order. Structured pruning needs dense ``nn.Linear``/``Conv1D`` layers: run it before
any 2:4 conversion.

Any other model (CNNs, vision transformers' MLPs, ...): :mod:`.channels` removes the inner
channels of every producer -> (BatchNorm, depthwise conv, activation) -> consumer chain
(:func:`prune_channels`, chains found by ``torch.fx``: :func:`find_channel_chains`).

Modules: :mod:`.prune` (:func:`structured_prune`, :class:`StructuredReport`, argument checks),
:mod:`.scores` (calibration runs, activation/Taylor statistics, unit importance),
:mod:`.arch` (where each model family keeps its units, and the in-place row/column surgery).
"""

from .channels import CHANNEL_CRITERIA, ChannelChain, ChannelReport, find_channel_chains, prune_channels
from .prune import CRITERIA, StructuredReport, structured_prune

__all__ = ["CRITERIA", "StructuredReport", "structured_prune", "CHANNEL_CRITERIA", "ChannelChain", "ChannelReport",
           "find_channel_chains", "prune_channels"]
