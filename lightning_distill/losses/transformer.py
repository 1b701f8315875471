r"""Transformer losses: attention maps, self-attention relations, layer maps and hidden-state dynamics.

Pure functions over the tensors a transformer exposes -- hidden states ``[N, L, D]``, attention
probabilities ``[N, H, L, L]`` (what Hugging Face models return as ``attentions``: softmax output, one
row per query position, one column per key position) and the query / key / value projections
``[N, L, D]`` -- used by :mod:`lightning_distill.objectives.transformer` (TinyBERT, MiniLM, MiniLMv2,
DistilBERT, hidden-state dynamics).

Conventions shared by every function here:

* computed in float32 (float64 inputs stay float64), whatever the input dtype or an enclosing autocast;
* ``mask`` is ``[N, L]``, True for real tokens (a Hugging Face ``attention_mask``); padded query rows
  and padded key columns are excluded -- what padded positions hold never changes the value (nor
  produces a NaN gradient), and a key distribution is renormalised over the real keys;
* averages are over real positions of the whole batch (token-level means, as every token loss of the
  package), and are 0, never NaN, when nothing is real.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_distill.losses.divergence import cross_entropy_loss, kd_loss
from lightning_distill.losses.feature import cosine_feature_loss, mse_feature_loss

__all__ = [
    "KD_POSITIONS",
    "LAYER_MAPS",
    "attention_kl_loss",
    "distilbert_loss",
    "attention_mse_loss",
    "hidden_state_dynamics_loss",
    "relation_kl_loss",
    "relation_log_probs",
    "resolve_layer_map",
    "split_heads",
]

#: named layer maps of :func:`resolve_layer_map` (plus an explicit ``{student_index: teacher_index}`` dict)
LAYER_MAPS = ("uniform", "skip", "last", "learned")
#: the losses :func:`hidden_state_dynamics_loss` compares differences with
DYNAMICS_LOSSES = ("mse", "cosine")
#: where :func:`distilbert_loss` compares the token distributions: every real token, or the labelled ones
KD_POSITIONS = ("tokens", "labelled")


def _acc(x: Tensor) -> Tensor:
    """float32 (float64 stays float64)."""
    return x.double() if x.dtype == torch.float64 else x.float()


def _token_mask(mask: Optional[Tensor], n: int, length: int, device: torch.device) -> Tensor:
    """``[N, L]`` bool mask (all True when ``mask`` is None), shape-checked."""
    if mask is None:
        return torch.ones(n, length, dtype=torch.bool, device=device)
    if tuple(mask.shape) != (n, length):
        raise ValueError(
            f"`mask` must be [N, L] = {[n, length]} (True for real tokens, e.g. the attention_mask), got shape "
            f"{list(mask.shape)}."
        )
    return mask.to(device=device).bool()


def _check_maps(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.ndim != 4 or teacher.ndim != 4:
        raise ValueError(
            f"{what} needs attention maps [N, heads, L, L] on both sides, got student {list(student.shape)} and "
            f"teacher {list(teacher.shape)}."
        )
    if student.shape[1] != teacher.shape[1]:
        raise ValueError(
            f"{what} compares attention maps head by head, but the student has {student.shape[1]} heads and the "
            f"teacher {teacher.shape[1]}. Use MiniLMv2 relation heads (relation_kl_loss / MiniLMLoss with "
            "relation_heads) to compare models with different head counts."
        )
    if student.shape != teacher.shape:
        raise ValueError(f"{what}: attention maps of different shapes, student {list(student.shape)} and teacher "
                         f"{list(teacher.shape)}.")


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``sum_j p_j (log p_j - log q_j)`` over the last dim; entries with ``p = 0`` contribute exactly 0."""
    p = log_p.exp()
    kept = p != 0  # both logs replaced where p = 0, so neither the value nor a gradient meets inf * 0 (NaN stays NaN)
    log_p = torch.where(kept, log_p, torch.zeros_like(log_p))
    log_q = torch.where(kept, log_q, torch.zeros_like(log_q))
    return (p * (log_p - log_q)).sum(-1).clamp_min(0.0)


def _mean_over_queries(per_row: Tensor, query: Tensor) -> Tensor:
    """Mean of ``per_row`` ``[N, H, L]`` over every head and real query (``query`` ``[N, L]``)."""
    keep = query.unsqueeze(1).expand_as(per_row)
    total = torch.where(keep, per_row, torch.zeros_like(per_row)).sum()
    return total / keep.sum().clamp_min(1)


# ------------------------------------------------------------------------------------------- layer maps
def resolve_layer_map(
    mapping: Union[str, Mapping[int, int]], student_layers: int, teacher_layers: int, step: Optional[int] = None
) -> list[tuple[int, int]]:
    r"""``[(student index, teacher index)]`` over ``hidden_states`` indices, in student order.

    Indices follow Hugging Face's ``hidden_states``: 0 is the embedding output, :math:`i` the output of
    layer :math:`i`; the student has :math:`M` = ``student_layers`` layers, the teacher :math:`N`. Named maps
    pair every student layer :math:`m = 1..M` with a teacher layer :math:`g(m)`:

    * ``"uniform"`` -- :math:`g(m) = \lfloor m N / M \rfloor` (TinyBERT, Jiao et al. 2020, arXiv:1909.10351);
    * ``"skip"`` -- :math:`g(m) = m k`, every k-th teacher layer, :math:`k` = ``step`` (default
      :math:`\lfloor N / M \rfloor`; PKD-skip, Sun et al. 2019, arXiv:1908.09355);
    * ``"last"`` -- :math:`g(m) = N - M + m`, the last :math:`M` teacher layers (PKD-last).

    A mapping ``{student_index: teacher_index}`` is taken as given (indices checked against the models;
    0 may appear on either side). ``"learned"`` is not a fixed map: see
    :class:`~lightning_distill.objectives.transformer.LayerMap`.

    Example::

        >>> resolve_layer_map("uniform", 4, 12)
        [(1, 3), (2, 6), (3, 9), (4, 12)]
        >>> resolve_layer_map("last", 2, 6), resolve_layer_map({0: 0, 2: 5}, 2, 6)
        ([(1, 5), (2, 6)], [(0, 0), (2, 5)])
    """
    from lightning_distill.features import map_layers

    m, n = int(student_layers), int(teacher_layers)
    if isinstance(mapping, Mapping):
        pairs = sorted((int(s), int(t)) for s, t in mapping.items())
        bad = [(s, t) for s, t in pairs if not (0 <= s <= m and 0 <= t <= n)]
        if not pairs or bad:
            raise ValueError(
                f"`layer_map` {dict(mapping)!r} pairs hidden-state indices out of range {bad}: the student has indices "
                f"0..{m} and the teacher 0..{n} (0 = embeddings, i = output of layer i)."
            )
        return pairs
    if mapping == "learned":
        raise ValueError("resolve_layer_map: 'learned' is not a fixed map (LayerMap builds its gate instead).")
    if mapping not in LAYER_MAPS:
        raise ValueError(f"`layer_map` must be one of {LAYER_MAPS} or a dict {{student_index: teacher_index}}, "
                         f"got {mapping!r}.")
    if m < 1 or n < 1:
        raise ValueError(f"a {mapping!r} layer map needs layers on both sides, got {m} student and {n} teacher layers.")
    try:
        pairs = map_layers(list(range(1, n + 1)), list(range(1, m + 1)), mapping, step)
    except ValueError as err:
        raise ValueError(f"`layer_map` {mapping!r} between {m} student and {n} teacher layers: {err}") from None
    return [(s, t) for t, s in pairs]


# ------------------------------------------------------------------------------------------- attention maps
def attention_mse_loss(student: Tensor, teacher: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    r"""TinyBERT's attention loss for one layer pair: the mean squared error of two attention maps.

    .. math::

        \mathcal{L}_{attn} = \frac{1}{H \sum_n |V_n|^2} \sum_n \sum_{h=1}^{H} \sum_{i, j \in V_n}
            \big(A^S_{n,h,i,j} - A^T_{n,h,i,j}\big)^2

    with :math:`V_n` the real tokens of sample :math:`n` (``mask``): padded queries (rows) and padded keys
    (columns) are excluded from the mean. ``student`` / ``teacher`` are ``[N, H, L, L]`` with the same
    number of heads (Jiao et al. 2020, arXiv:1909.10351, average over heads). The paper fits the
    unnormalised scores :math:`QK^\top/\sqrt{d_k}`; any ``[N, H, L, L]`` maps can be passed here (the
    objective passes the probabilities Hugging Face models return).

    Example::

        >>> import torch
        >>> a = torch.tensor([[[[0.5, 0.5], [0.2, 0.8]]]])
        >>> b = torch.tensor([[[[1.0, 0.0], [0.2, 0.8]]]])
        >>> attention_mse_loss(a, b).item()           # (0.25 + 0.25 + 0 + 0) / 4
        0.125
        >>> attention_mse_loss(a, b, mask=torch.tensor([[False, True]])).item()   # only (query 1, key 1)
        0.0
    """
    _check_maps(student, teacher, "attention_mse_loss")
    n, _, length, _ = student.shape
    with torch.autocast(device_type=student.device.type, enabled=False):
        real = _token_mask(mask, n, length, student.device)
        pair = (real.unsqueeze(-1) & real.unsqueeze(-2)).unsqueeze(1).expand(student.shape)  # [N, H, L, L]
        sq = (_acc(student) - _acc(teacher)).pow(2)
        total = torch.where(pair, sq, torch.zeros_like(sq)).sum()
        return total / pair.sum().clamp_min(1)


def _log_key_distribution(probs: Tensor, key: Tensor) -> Tensor:
    """Log of ``probs`` restricted to real keys and renormalised over them (finite everywhere)."""
    tiny = torch.finfo(probs.dtype).tiny
    p = torch.where(key, probs, torch.zeros_like(probs)).clamp_min(0.0)
    p = p / p.sum(-1, keepdim=True).clamp_min(tiny)
    return torch.where(key, torch.log(p.clamp_min(tiny)), torch.full_like(p, -math.inf))


def attention_kl_loss(student: Tensor, teacher: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    r"""MiniLM's self-attention distribution transfer: KL(teacher ‖ student) of attention probabilities.

    .. math::

        \mathcal{L}_{AT} = \frac{1}{H \sum_n |V_n|} \sum_n \sum_{h=1}^{H} \sum_{i \in V_n}
            \mathrm{KL}\big(A^T_{n,h,i,\cdot} \,\|\, A^S_{n,h,i,\cdot}\big)

    over every head :math:`h` and real query :math:`i`, each row a distribution over the real keys
    :math:`j \in V_n` (Wang et al. 2020, MiniLM, arXiv:2002.10957, eq. 2). ``student`` / ``teacher`` are
    attention *probabilities* ``[N, H, L, L]`` (softmax output, e.g. Hugging Face ``attentions``) with equal
    head counts; rows are restricted to the real keys and renormalised there, so the mass a model may put
    on padding is ignored. Keys the teacher gives probability 0 (a causal model's future tokens) add 0;
    student probabilities are floored at the smallest normal float, so the value stays finite. >= 0.

    Example::

        >>> import torch
        >>> t = torch.tensor([[[[0.5, 0.5], [1.0, 0.0]]]])
        >>> s = torch.tensor([[[[0.25, 0.75], [1.0, 0.0]]]])
        >>> round(attention_kl_loss(s, t).item(), 4)    # (0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75)) / 2 rows
        0.0719
    """
    _check_maps(student, teacher, "attention_kl_loss")
    n, _, length, _ = student.shape
    with torch.autocast(device_type=student.device.type, enabled=False):
        real = _token_mask(mask, n, length, student.device)
        key = real[:, None, None, :]
        log_t = _log_key_distribution(_acc(teacher), key)
        log_s = _log_key_distribution(_acc(student), key)
        return _mean_over_queries(_kl_rows(log_t, log_s), real)


# ------------------------------------------------------------------------------------------- relations
def split_heads(x: Tensor, heads: int) -> Tensor:
    r"""``[N, L, D]`` -> ``[N, heads, L, D / heads]``: the concatenated heads of a projection, re-split.

    MiniLMv2 concatenates the queries (keys, values) of all attention heads and splits them again into
    ``heads`` relation heads of equal size, so teacher and student may have different head counts.

    Example::

        >>> import torch
        >>> split_heads(torch.arange(8.0).reshape(1, 2, 4), 2)[0, 1].tolist()   # the second head
        [[2.0, 3.0], [6.0, 7.0]]
    """
    if x.ndim != 3:
        raise ValueError(f"split_heads needs [N, L, D] projections, got shape {list(x.shape)}.")
    n, length, d = x.shape
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or d % heads:
        raise ValueError(
            f"cannot split a width of {d} into {heads!r} relation heads of equal size: `relation_heads` must divide "
            f"the width of every projection it splits ({d} here)."
        )
    return x.reshape(n, length, heads, d // heads).transpose(1, 2)


def relation_log_probs(x: Tensor, heads: int, mask: Optional[Tensor] = None, causal: bool = False) -> Tensor:
    r"""Self-attention relation of one projection, in log space: ``log softmax(x_h x_h^T / sqrt(d_h))``.

    ``x`` ``[N, L, D]`` is split into ``heads`` heads of size :math:`d_h = D / \text{heads}`
    (:func:`split_heads`); the result is ``[N, heads, L, L]``, one distribution over the real keys per query
    (padded keys, and with ``causal=True`` keys after the query, get probability 0 -- a log of the float
    minimum, finite). MiniLM's value relation (arXiv:2002.10957) and MiniLMv2's Q-Q / K-K / V-V relations
    (Wang et al. 2021, arXiv:2012.15828).

    Example::

        >>> import torch
        >>> x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
        >>> [round(v, 4) for v in relation_log_probs(x, 1)[0, 0, 0].exp().tolist()]   # softmax([1, 0] / sqrt 2)
        [0.6698, 0.3302]
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        h = split_heads(_acc(x), heads)
        n, _, length, d = h.shape
        real = _token_mask(mask, n, length, x.device)
        scores = h @ h.transpose(-1, -2) / math.sqrt(d)
        key = real[:, None, None, :]
        if causal:
            key = key & torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~key, torch.finfo(scores.dtype).min)
        return F.log_softmax(scores, dim=-1)


def relation_kl_loss(
    student: Tensor, teacher: Tensor, heads: int, mask: Optional[Tensor] = None, causal: bool = False
) -> Tensor:
    r"""MiniLM / MiniLMv2 self-attention relation transfer for one projection (queries, keys or values).

    With :math:`R = \mathrm{softmax}(X_h X_h^\top / \sqrt{d_h})` per relation head :math:`h`
    (:func:`relation_log_probs`; :math:`d_h` is each model's own head size):

    .. math::

        \mathcal{L}_{R} = \frac{1}{H_r \sum_n |V_n|} \sum_n \sum_{h=1}^{H_r} \sum_{i \in V_n}
            \mathrm{KL}\big(R^T_{n,h,i,\cdot} \,\|\, R^S_{n,h,i,\cdot}\big)

    ``student`` ``[N, L, D_S]`` and ``teacher`` ``[N, L, D_T]`` are both split into :math:`H_r` = ``heads``
    heads: MiniLM's value relation uses the models' own attention heads (equal counts), MiniLMv2 re-splits
    the concatenated heads into ``heads`` relation heads so that widths and head counts may differ
    (Wang et al. 2021, arXiv:2012.15828). Padded queries and keys are excluded; ``causal`` also excludes keys
    after the query. Invariant to permuting the tokens of a sample (the same way on both sides) and to any
    orthogonal transform within a head. >= 0.

    Example::

        >>> import torch
        >>> x = torch.randn(2, 5, 8)
        >>> relation_kl_loss(x, x, heads=2).item()
        0.0
        >>> relation_kl_loss(x, torch.randn(2, 5, 12), heads=4).item() > 0   # widths may differ
        True
    """
    if student.ndim != 3 or teacher.ndim != 3 or student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"relation_kl_loss needs [N, L, D] student and teacher projections with the same N and L, got "
            f"{list(student.shape)} and {list(teacher.shape)}."
        )
    with torch.autocast(device_type=student.device.type, enabled=False):
        real = _token_mask(mask, student.shape[0], student.shape[1], student.device)
        log_s = relation_log_probs(student, heads, real, causal)
        log_t = relation_log_probs(teacher, heads, real, causal)
        return _mean_over_queries(_kl_rows(log_t, log_s), real)


# ------------------------------------------------------------------------------------------- dynamics
def hidden_state_dynamics_loss(
    student: Sequence[Tensor],
    teacher: Sequence[Tensor],
    mask: Optional[Tensor] = None,
    loss: str = "mse",
    project: Union[None, Callable[[Tensor], Tensor], Sequence[Callable[[Tensor], Tensor]]] = None,
) -> Tensor:
    r"""Match the layer-to-layer *change* of hidden states, not only the states.

    For :math:`K \ge 2` points of each model's trajectory (student states :math:`s_1..s_K`, the teacher
    states they are mapped to :math:`t_1..t_K`, each ``[N, L, D]``), the first-order differences
    :math:`\Delta s_k = s_{k+1} - s_k` and :math:`\Delta t_k = t_{k+1} - t_k` are compared:

    .. math::

        \mathcal{L}_{dyn} = \frac{1}{K - 1} \sum_{k=1}^{K-1} \ell\big(P_k(\Delta s_k),\ \Delta t_k\big)

    with :math:`\ell` the masked mean squared error (``"mse"``, over real tokens and features) or
    :math:`1 - \cos` per real token (``"cosine"``), and :math:`P_k` an optional linear map (``project``: one
    callable for every difference, or one per difference) when the widths differ. Apply :math:`P` to the
    differences, not the states: a linear map of a difference is the difference of the mapped states
    (without bias), so the student is asked to move as the teacher moves, in the teacher's coordinates.

    Example::

        >>> import torch
        >>> s = [torch.zeros(1, 2, 3), torch.ones(1, 2, 3)]
        >>> t = [torch.full((1, 2, 3), 5.0), torch.full((1, 2, 3), 6.0)]   # shifted, same change
        >>> hidden_state_dynamics_loss(s, t).item()
        0.0
        >>> hidden_state_dynamics_loss(s, [t[0], t[0]]).item()               # the teacher does not move
        1.0
    """
    if loss not in DYNAMICS_LOSSES:
        raise ValueError(f"`loss` must be one of {DYNAMICS_LOSSES}, got {loss!r}.")
    student, teacher = list(student), list(teacher)
    if len(student) != len(teacher) or len(student) < 2:
        raise ValueError(
            f"hidden_state_dynamics_loss needs the same number (>= 2) of student and teacher states, got "
            f"{len(student)} and {len(teacher)}: a difference needs two layers on each side."
        )
    k = len(student) - 1
    projections = list(project) if isinstance(project, (list, tuple)) else [project] * k
    if len(projections) != k:
        raise ValueError(f"`project` has {len(projections)} maps for {k} differences; give one, or one per difference.")
    fn = mse_feature_loss if loss == "mse" else cosine_feature_loss
    total = None
    for i in range(k):
        ds = _acc(student[i + 1]) - _acc(student[i])
        if projections[i] is not None:
            ds = projections[i](ds)
        dt = _acc(teacher[i + 1]) - _acc(teacher[i])
        term = fn(ds, dt, mask=mask.bool() if mask is not None else None)
        total = term if total is None else total + term
    return total / k


# ------------------------------------------------------------------------------------------- DistilBERT
def distilbert_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Optional[Tensor],
    student_hidden: Optional[Tensor] = None,
    teacher_hidden: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    temperature: float = 2.0,
    kd_positions: str = "tokens",
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""DistilBERT's triple loss, unweighted: ``(kd, mlm, cos)`` (Sanh et al. 2019, arXiv:1910.01108).

    .. math::

        \mathrm{kd} = \frac{T^2}{|P|} \sum_{i \in P} \mathrm{KL}\big(\mathrm{softmax}(z^T_i / T) \,\|\,
            \mathrm{softmax}(z^S_i / T)\big), \qquad
        \mathrm{mlm} = \frac{1}{|Y|} \sum_{i \in Y} -\log \mathrm{softmax}(z^S_i)_{y_i}, \qquad
        \mathrm{cos} = \frac{1}{|V|} \sum_{i \in V} \big(1 - \cos(h^S_i, h^T_i)\big)

    over token positions: :math:`V` the real tokens (``mask``), :math:`Y` the labelled ones (``target`` not
    ``ignore_index``: the masked positions of a masked-LM batch) and :math:`P` = :math:`V` for
    ``kd_positions="tokens"`` or :math:`V \cap Y` for ``"labelled"``. The authors' training code
    (``Distiller.step`` of Hugging Face's distillation example) compares the distributions on every real
    token by default (``--restrict_ce_to_mask`` off; on, it uses the masked positions only), with
    ``KLDivLoss(reduction="batchmean")`` over the selected rows times :math:`T^2`, ``CrossEntropyLoss`` for
    the MLM term and ``CosineEmbeddingLoss`` on the last hidden states of the real tokens -- the same three
    numbers as here. The cosine term is 0 without hidden states. Logits ``[N, L, V]``, hidden ``[N, L, D]``.

    Example::

        >>> import torch
        >>> z = torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])
        >>> kd, mlm, cos = distilbert_loss(z, z, torch.tensor([[0, -100]]), z, z)
        >>> kd.item(), round(mlm.item(), 4), cos.item()
        (0.0, 0.1269, 0.0)
    """
    if kd_positions not in KD_POSITIONS:
        raise ValueError(f"`kd_positions` must be one of {KD_POSITIONS}, got {kd_positions!r}.")
    if student_logits.ndim != 3:
        raise ValueError(f"distilbert_loss needs token logits [N, L, V], got shape {list(student_logits.shape)}.")
    n, length = student_logits.shape[:2]
    real = _token_mask(mask, n, length, student_logits.device)
    positions = real
    if kd_positions == "labelled":
        labelled = torch.zeros_like(real) if target is None else target.to(real.device) != ignore_index
        positions = real & labelled
    kd = kd_loss(student_logits, teacher_logits, temperature, mask=positions)
    mlm = cross_entropy_loss(student_logits, target, ignore_index)
    if student_hidden is None or teacher_hidden is None:
        cos = kd.new_zeros(())
    else:
        cos = cosine_feature_loss(student_hidden, teacher_hidden, mask=real)
    return kd, mlm, cos
