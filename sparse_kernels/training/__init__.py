"""Training-time pruning: masks that survive optimizer steps, pruning schedules, recovery fine-tuning.

* :mod:`.masks`: :func:`attach_mask`, :class:`MaskedTraining`, :func:`apply_masks`,
  :func:`load_masked_state_dict`.
* :mod:`.schedule`: :class:`OneShot`, :class:`Iterative`, :class:`Cubic`, :class:`MagnitudePruner`.
* :mod:`.finetune`: :func:`finetune` (masks fixed), :func:`lm_loss`, :func:`mask_zeros_`.
* :mod:`.nm`: :class:`NMSparseTraining` (dynamic N:M masks: STE / SR-STE), :func:`nm_mask`.
* :mod:`.batchnorm`: :func:`recalibrate_batchnorm` (BatchNorm statistics re-estimated after pruning).

Lottery tickets are in :mod:`sparse_kernels.lottery`, structured pruning in
:mod:`sparse_kernels.structured`.
"""

from .batchnorm import recalibrate_batchnorm
from .finetune import finetune, lm_loss, mask_zeros_
from .masks import (MaskedTraining, apply_masks, attach_mask, get_mask, load_masked_state_dict,
                    masked_parameters, remove_mask, set_mask)
from .nm import NMSparseTraining, nm_mask
from .schedule import Cubic, Iterative, MagnitudePruner, OneShot, Schedule, bottom_k_mask, n_pruned

__all__ = [
    "Cubic", "Iterative", "MagnitudePruner", "MaskedTraining", "OneShot", "Schedule", "apply_masks",
    "attach_mask", "bottom_k_mask", "finetune", "get_mask", "lm_loss", "load_masked_state_dict",
    "mask_zeros_", "masked_parameters", "n_pruned", "remove_mask", "set_mask", "NMSparseTraining", "nm_mask",
    "recalibrate_batchnorm",
]
