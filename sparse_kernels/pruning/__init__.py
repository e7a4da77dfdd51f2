"""Pruning algorithms: SparseGPT, Wanda, magnitude, per layer and for whole models.

* Per layer: :func:`sparsegpt_prune` (uses the fused ``sparsegpt_block_update`` op),
  :func:`wanda_prune`, :func:`ria_prune`, :func:`magnitude_prune`, :func:`magnitude_prune_global`; statistics
  from :class:`HessianAccumulator` and :class:`ActivationNormAccumulator`.
* Per model: :func:`prune` (sequential, block by block) returning a :class:`PruneReport`;
  new methods plug in through :func:`register_method`.
* N:M input-channel permutation (``prune(permute=True)``): :func:`find_permutation`;
  :func:`fold_permutations` moves a permutation into the layers that produce the input.
* DSnoT mask refinement (``prune(dsnot=True)``, mask-only criteria): :func:`dsnot_refine`.
* Sparsity specs (``0.5``, ``"2:4"``, ``"4:8"``: N kept of every M along the input dim):
  :func:`parse_sparsity`.  Masks are bool, True = kept.
"""

from .criteria import ActivationNormAccumulator, magnitude_prune, magnitude_prune_global, ria_prune, wanda_prune
from .model import METHODS, LayerReport, PruneReport, PruningMethod, find_blocks, prunable_layers, prune, register_method
from .patterns import Sparsity, parse_sparsity
from .dsnot import ActivationMomentsAccumulator, dsnot_refine
from .fold import fold_permutations
from .permutation import find_permutation
from .sparsegpt import HessianAccumulator, HessianWarning, sparsegpt_prune

__all__ = [
    "ActivationMomentsAccumulator", "ActivationNormAccumulator", "dsnot_refine", "HessianAccumulator", "HessianWarning", "LayerReport", "METHODS",
    "PruneReport", "PruningMethod", "Sparsity", "find_blocks", "find_permutation", "fold_permutations", "magnitude_prune", "magnitude_prune_global",
    "parse_sparsity", "prunable_layers", "prune", "register_method", "ria_prune", "sparsegpt_prune", "wanda_prune",
]
