"""Reference SparseGPT (Frantar & Alistarh, 2023), written as the paper's Algorithm 1.

Functions:

* :func:`sparsegpt_block_update` -- the inner column loop over one block of ``B`` columns,
  the default (CompositeExplicitAutograd) kernel of ``sparse_kernels::sparsegpt_block_update``;
  :func:`sparsegpt_block_update_int4` the same loop with joint int4 quantization (the default
  kernel of ``sparse_kernels::sparsegpt_block_update_int4``).
* :func:`sparsegpt_layer` -- the whole layer: dead columns, dampening, the upper Cholesky
  factor of ``H^-1``, block masks, the block loop and the lazy update, column loop in
  PyTorch.  The fast path (:func:`sparse_kernels.pruning.sparsegpt_prune`) runs the same
  steps with a fused kernel for the block; tests and benchmarks compare the two.

Conventions (shared by every backend):

* ``W1`` ``[rows, B]`` float32, ``Hinv1`` ``[B, B]`` float32: the diagonal block of the
  upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``); only its upper triangle is read.
* ``mask1`` ``[rows, B]`` bool, True = the weight is KEPT (the original code stores the
  opposite).  Used when ``m == 0``; ignored when ``m > 0``.
* ``m > 0``: N:M -- when the loop reaches a group start ``i`` (``i % m == 0``) it keeps the
  ``n`` largest scores ``W1[:, j]^2 / Hinv1[j, j]^2``, ``j`` in ``[i, i + m)``, of the
  *current* (already updated) weights; ties go to the lower column.  ``B % m == 0``.
* For each column ``i``: ``q = w if kept else 0``, ``err = (w - q) / Hinv1[i, i]``,
  ``W1[:, i:] -= err (outer) Hinv1[i, i:]``.  Returns ``(Q1, Err1, losses)``: the pruned
  block, the scaled errors (both ``[rows, B]``) and ``losses [rows]`` =
  ``sum_i (w - q)^2 / Hinv1[i, i]^2 / 2``.  ``W1`` is not modified.
"""

from __future__ import annotations

import numpy as np
import torch


def keep_top_n(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask over the last dim of ``scores [..., m]``: the ``n`` largest, ties to the lower index."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(scores, dtype=torch.bool)
    return keep.scatter_(-1, order[..., :n], True)


def sparsegpt_block_update(W1: torch.Tensor, Hinv1: torch.Tensor, mask1: torch.Tensor | None, n: int, m: int):
    W1 = W1.clone()
    rows, B = W1.shape
    Q1 = torch.zeros_like(W1)
    Err1 = torch.zeros_like(W1)
    Losses1 = torch.zeros_like(W1)
    d_all = torch.diagonal(Hinv1)
    keep = mask1.clone() if m == 0 else torch.zeros_like(W1, dtype=torch.bool)

    for i in range(B):
        w = W1[:, i]
        d = Hinv1[i, i]
        if m > 0 and i % m == 0:
            score = W1[:, i:i + m] ** 2 / d_all[i:i + m].reshape(1, -1) ** 2
            keep[:, i:i + m] = keep_top_n(score, n)
        q = torch.where(keep[:, i], w, torch.zeros_like(w))
        Q1[:, i] = q
        Losses1[:, i] = (w - q) ** 2 / d ** 2
        err1 = (w - q) / d
        W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
        Err1[:, i] = err1

    return Q1, Err1, torch.sum(Losses1, 1) / 2


def int4_group_scale(amax: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """The joint int4 path's group scale from a group's ``max |w|`` (float32 ``[rows]``):
    ``amax / 7`` (1 where ``amax`` is not > 0, NaN included), rounded to ``scale_dtype`` (the
    checkpoint stores it there) and back to float32; a scale that underflows to 0 in a 16-bit
    dtype becomes that dtype's smallest normal, so ``w / s`` stays finite."""
    s = torch.where(amax > 0, amax / 7, torch.ones_like(amax)).to(scale_dtype).to(torch.float32)
    return torch.where(s > 0, s, torch.full_like(s, torch.finfo(scale_dtype).tiny))


def sparsegpt_block_update_int4(W1: torch.Tensor, Hinv1: torch.Tensor, mask1: torch.Tensor | None, n: int, m: int,
                                group_size: int, scale_dtype: torch.dtype):
    """The column loop with joint int4 quantization (SparseGPT's joint mode, GPTQ's groups).

    As :func:`sparsegpt_block_update`, except that a kept weight becomes its int4 value
    ``q = clamp(round(w / s), -8, 7) * s`` (round half to even) instead of ``w``, so the error
    ``(w - q) / d`` also carries the rounding.  The scale ``s`` of a row's group of
    ``group_size`` columns (``B % group_size == 0``) is set when the loop reaches the group's
    first column, by :func:`int4_group_scale` from ``max |w|`` over the group's current
    (already updated) weights: the kept ones when ``m == 0``; all of them for N:M (the later
    N:M groups' masks are chosen later in the loop).  At an N:M group start the mask is chosen
    first, as in :func:`sparsegpt_block_update`.

    Returns ``(Q1, Err1, losses, keep, codes, scales)``: the first three as there; ``keep``
    bool ``[rows, B]`` the mask the loop used (a kept weight can round to 0, so ``Q1`` does not
    give it back); ``codes`` int8 ``[rows, B]`` (``q / s``, 0 where pruned); ``scales`` float32
    ``[rows, B / group_size]`` (values of ``scale_dtype``).  ``Q1 == codes * scales`` exactly.
    """
    W1 = W1.clone()
    rows, B = W1.shape
    Q1, Err1, Losses1 = torch.zeros_like(W1), torch.zeros_like(W1), torch.zeros_like(W1)
    codes = torch.zeros(rows, B, dtype=torch.int8, device=W1.device)
    scales = torch.ones(rows, B // group_size, dtype=torch.float32, device=W1.device)
    d_all = torch.diagonal(Hinv1)
    keep = mask1.clone() if m == 0 else torch.zeros_like(W1, dtype=torch.bool)
    s = None
    for i in range(B):
        w, d = W1[:, i], Hinv1[i, i]
        if m > 0 and i % m == 0:
            score = W1[:, i:i + m] ** 2 / d_all[i:i + m].reshape(1, -1) ** 2
            keep[:, i:i + m] = keep_top_n(score, n)
        if i % group_size == 0:
            grp = W1[:, i:i + group_size].abs()
            s = int4_group_scale((grp * keep[:, i:i + group_size] if m == 0 else grp).amax(1), scale_dtype)
            scales[:, i // group_size] = s
        # + 0.0: a small negative w rounds to -0.0; the stored code 0 means +0.0
        qi = torch.where(keep[:, i], torch.clamp(torch.round(w / s), -8, 7), torch.zeros_like(w)) + 0.0
        codes[:, i] = qi.to(torch.int8)
        q = qi * s
        Q1[:, i] = q
        Losses1[:, i] = (w - q) ** 2 / d ** 2
        err1 = (w - q) / d
        W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
        Err1[:, i] = err1
    return Q1, Err1, torch.sum(Losses1, 1) / 2, keep, codes, scales


def sparsegpt_lazy_update(W: torch.Tensor, Err1: torch.Tensor, U: torch.Tensor) -> None:
    """The lazy update of later columns, in place: ``W -= Err1 @ U`` (``W [rows, L]``,
    ``Err1 [rows, B]``, ``U [B, L]``, float32).  Default kernel of
    ``sparse_kernels::sparsegpt_lazy_update``; one in-place GEMM (``addmm_``, beta = 1)."""
    W.addmm_(Err1, U, alpha=-1)


# ------------------------------------------------------------------ the layer
def nm_mask_of(Q1: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The N:M keep mask of a pruned block ``Q1``: every nonzero, topped up with zeros.

    The block op returns values, not the mask; a kept weight can be exactly 0, so the mask
    is rebuilt as the ``n`` largest ``|q|`` of each group (ties to the lower column).  It has
    exactly ``n`` True per group and covers every nonzero (a group has at most ``n``).
    """
    rows, B = Q1.shape
    keep = Q1 != 0
    groups = keep.view(rows, B // m, m)
    short = groups.sum(-1) != n
    if not short.any():  # usual: the nonzeros are the n largest |q| (0.35 ms vs 3.4 ms to sort 2048x128)
        return keep
    groups[short] = keep_top_n(Q1.abs().reshape(rows, B // m, m)[short], n)
    return keep


def upper_inverse_factor(H: torch.Tensor) -> torch.Tensor:
    """The paper's step 3: Cholesky, inverse, upper Cholesky: ``U`` with ``H^-1 = U^T U``."""
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True)


def prepare_hessian(W: torch.Tensor, H: torch.Tensor, percdamp: float, factor=None):
    """Steps 1-3: dead columns, dampening, ``Hinv = chol(chol_inverse(chol(H)), upper)``.

    ``W`` float32 ``[rows, cols]`` (a copy: its dead columns are zeroed), ``H`` ``[cols, cols]``.
    ``factor(H) -> U`` replaces :func:`upper_inverse_factor` (the fast path computes the same
    factor another way).  Returns ``(W, Hinv)``.  Raises ``torch.linalg.LinAlgError`` when
    ``H + damp I`` is not positive definite (the caller retries with more dampening).
    """
    H = H.to(torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(H.shape[0], device=H.device)
    H[diag, diag] += damp
    Hinv = (factor or upper_inverse_factor)(H)
    return W, Hinv


def unstructured_block_mask(W1: torch.Tensor, d: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep mask of one block: prune exactly ``round(numel * sparsity)`` lowest ``w^2/d^2``.

    Ties: among equal scores the lower flat index (row-major) is kept.  The original code
    thresholds with ``<=`` at the ``int(numel * sparsity)``-th sorted score, which prunes one
    more weight (and every tie); we prune an exact count so each block's sparsity is exact.
    """
    score = (W1 ** 2 / d.reshape(1, -1) ** 2).flatten()
    return keep_top_n_flat(score, score.numel() - int(round(score.numel() * sparsity))).view_as(W1)


def keep_top_n_flat(score: torch.Tensor, n_keep: int) -> torch.Tensor:
    """``keep_top_n`` on a 1-D tensor in O(numel): a k-th value threshold, then the ties at the
    threshold with the highest indices are pruned (so the lower index is kept).  NaN scores
    count as the largest (kept)."""
    k = score.numel() - n_keep  # how many to prune
    if k <= 0:
        return torch.ones_like(score, dtype=torch.bool)
    if n_keep <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    score = torch.nan_to_num(score, nan=float("inf"))
    if score.device.type != "cpu":
        return _keep_top_n_sorted(score, n_keep)
    # numpy's introselect: 2 ms vs torch.kthvalue's 116 ms for 1.4M floats (1 thread, dev box)
    thresh = torch.as_tensor(np.partition(score.detach().numpy(), k - 1)[k - 1])
    keep = score > thresh
    ties = (score == thresh).nonzero().flatten()
    n_tie_pruned = k - int((score < thresh).sum())
    keep[ties[: ties.numel() - n_tie_pruned]] = True
    return keep


def _keep_top_n_sorted(score: torch.Tensor, n_keep: int) -> torch.Tensor:
    """``keep_top_n_flat`` by one stable descending sort (equal scores: lower index first, so
    kept first), with no host synchronisation.  The GPU path: on the H200 (2026-11-28) the
    unstructured layer took 100 ms at 4096x4096 against 19 ms for 2:4, the difference being
    this per-block selection, then ``torch.kthvalue`` (one thread block per slice on CUDA, and
    the whole 4096x128 block is one slice) plus two host syncs."""
    order = torch.sort(score, descending=True, stable=True).indices
    keep = torch.zeros_like(score, dtype=torch.bool)
    keep[order[:n_keep]] = True
    return keep


def sparsegpt_layer(W, Hinv, *, sparsity=0.0, n=0, m=0, blocksize=128, block_update=None, lazy_update=None):
    """Steps 4-5 on a prepared ``W`` (float32, modified in place) and ``Hinv`` (upper factor).

    ``block_update(W1, Hinv1, mask1, n, m) -> (Q1, Err1, losses)`` defaults to the reference
    column loop.  ``lazy_update(W_later, Err1, Hinv_rows)`` (in place) defaults to the paper's
    ``W -= Err1 @ Hinv`` (a GEMM into a temporary, then a subtraction); the fast path passes the
    ``sparsegpt_lazy_update`` op (an in-place ``addmm_``, or the cpp kernel that skips Err1's
    zeros).  Returns ``(W, keep_mask, losses [rows])``.
    """
    block_update = block_update or sparsegpt_block_update
    rows, cols = W.shape
    losses = torch.zeros(rows, device=W.device, dtype=torch.float32)
    keep = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2]
        Hinv1 = Hinv[i1:i2, i1:i2]
        mask1 = None
        if m == 0:
            mask1 = unstructured_block_mask(W1, torch.diagonal(Hinv1), sparsity)
        Q1, Err1, l1 = block_update(W1, Hinv1, mask1, n, m)
        W[:, i1:i2] = Q1
        keep[:, i1:i2] = mask1 if m == 0 else nm_mask_of(Q1, n, m)
        losses += l1
        if i2 == cols:
            break
        if lazy_update is not None:
            lazy_update(W[:, i2:], Err1, Hinv[i1:i2, i2:])
        else:
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W, keep, losses
