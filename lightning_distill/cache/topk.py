r"""Top-k codec: keep the ``k`` largest logits per position and the log-sum-exp of the rest.

For large class / vocabulary counts, ``top_k=k`` storage keeps, per position, the ``k`` largest
logits, their class ids and ``lse_rest``, the log-sum-exp of the other ``C - k`` logits
(:func:`dense_to_topk`); :func:`topk_to_dense` rebuilds dense logits with the top-k entries exact
and every tail class at ``lse_rest - log(C - k)`` (the tail's mass spread uniformly).

**Error bound.** At ``T = 1`` the normaliser, the top-k probabilities and the tail's total mass
``eps`` are exact; only how ``eps`` splits *inside* the tail is lost, so for any student
distribution ``q``

.. math::

    KL(p \| q) - KL(\hat p \| q) = \epsilon \, [KL(r \| q_{tail}) - KL(u \| q_{tail})],
    \qquad \| p - \hat p \|_1 \le 2 \epsilon

(``r`` the true tail distribution, ``u`` uniform, ``q_tail`` the student's renormalised tail);
since the gradient of ``KL(p || q)`` with respect to the student's logits is ``q - p``, the
per-sample gradient moves by at most ``2 eps`` in L1 (divided by ``N`` under ``batchmean``).
At a temperature ``T >= 1`` the rebuilt tail is *over*-weighted (Jensen: for a given
``sum exp(z)`` the uniform tail has the largest ``sum exp(z / T)``), so the true and the rebuilt
tail mass at ``T`` are both at most :math:`\hat\epsilon_T`, the tail mass of
``softmax(z_hat / T)`` -- computable from the cached values -- and
:math:`\|p^T - \hat p^T\|_1 \le 2\hat\epsilon_T`: the gradient of the ``T^2``-scaled, batchmean KD
loss with respect to one sample's student logits moves by at most :math:`2 T \hat\epsilon_T / N`
(L1). It is small for a peaked teacher (most mass in the top-k); choose ``k`` so that
:math:`\hat\epsilon_T` at your temperature is small, or use dense storage.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["dense_to_topk", "topk_to_dense"]


def dense_to_topk(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Split logits ``[..., C]`` into the ``k`` largest (values, class ids) and the tail's log-sum-exp.

    Returns ``(values [..., k], indices [..., k] int64, lse_rest [...])``, float32 (float64 for
    float64 logits), where
    ``lse_rest = log sum_{c not in top-k} exp(z_c)`` (computed by masking, so it stays accurate when
    the tail is negligible). Requires ``1 <= k < C``.

    Example::

        >>> import torch
        >>> from lightning_distill.cache import dense_to_topk
        >>> v, i, rest = dense_to_topk(torch.tensor([[0.0, 3.0, 1.0, 0.0]]), 2)
        >>> v.tolist(), i.tolist(), round(rest.item(), 4)  # rest = log(e^0 + e^0)
        ([[3.0, 1.0]], [[1, 2]], 0.6931)
    """
    c = logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < c:
        raise ValueError(
            f"`top_k` must be an integer in [1, C - 1] = [1, {c - 1}] for logits with C={c} classes, got {k!r}. "
            "Use top_k=None for dense storage."
        )
    flat = logits.detach().reshape(-1, c)
    dtype = torch.float64 if flat.dtype == torch.float64 else torch.float32
    values, indices, rests = [], [], []
    rows = max(1, 2**24 // c)  # bound the masked copy to ~64 MB (a [B, L, V] vocabulary can be large)
    for start in range(0, flat.shape[0], rows):
        z = flat[start : start + rows].to(dtype, copy=True)  # scatter_ below must not touch the input
        v, i = z.topk(k, dim=-1)
        values.append(v)
        indices.append(i)
        rests.append(z.scatter_(-1, i, float("-inf")).logsumexp(-1))
    lead = tuple(logits.shape[:-1])
    if not values:  # no rows
        return flat.new_empty((*lead, k), dtype=dtype), flat.new_empty((*lead, k), dtype=torch.long), flat.new_empty(
            lead, dtype=dtype
        )
    return (torch.cat(values).reshape(*lead, k), torch.cat(indices).reshape(*lead, k), torch.cat(rests).reshape(lead))


def topk_to_dense(values: Tensor, indices: Tensor, lse_rest: Tensor, num_classes: int) -> Tensor:
    r"""Rebuild dense logits ``[..., C]`` (float32, or float64 for float64 values) from top-k storage.

    See the docstring of this module (:mod:`lightning_distill.cache.topk`) for the bound on the error.

    The ``k`` stored entries are exact; each of the other ``C - k`` classes gets
    ``lse_rest - log(C - k)``, so the log-partition function, the top-k probabilities and the
    tail's total probability are exact at temperature 1 and only the split of the tail mass among
    its classes is approximated (uniform).

    Example::

        >>> import math, torch
        >>> from lightning_distill.cache import dense_to_topk, topk_to_dense
        >>> z = torch.tensor([3.0, 1.0, 0.0, -1.0])
        >>> z_hat = topk_to_dense(*dense_to_topk(z, 2), num_classes=4)
        >>> z_hat[:2].tolist(), round(z_hat[2].item(), 4) == round(math.log((1 + math.exp(-1)) / 2), 4)
        ([3.0, 1.0], True)
        >>> torch.allclose(z_hat.softmax(-1)[:2], z.softmax(-1)[:2])
        True
    """
    k = values.shape[-1]
    dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
    fill = (lse_rest.to(dtype) - math.log(num_classes - k)).unsqueeze(-1)
    out = fill.expand(*values.shape[:-1], num_classes).clone()
    return out.scatter_(-1, indices.long(), values.to(dtype))
