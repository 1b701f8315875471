"""Distillation losses as pure tensor functions.

Every function here is stateless: tensors in, a tensor out. Objectives in
:mod:`lightning_distill.objectives` combine them; tests in ``tests/test_losses.py`` check
them against independently computed values.

Conventions shared by every function:

* divergences are computed in float32 and in log space, whatever the input dtype or an
  enclosing autocast region, so they stay finite for logits of magnitude 1e4 and under bf16;
* the KL term is scaled by ``T**2`` (Hinton et al. 2015) so its gradient magnitude does not
  shrink as the temperature grows;
* reduction ``"batchmean"`` sums over classes and averages over samples -- or over *valid*
  tokens when logits are ``[N, L, C]`` -- never over classes (``reduction="mean"`` in
  ``F.kl_div`` silently divides by the class count, a classic KD bug).

The functions live in four modules by family -- :mod:`~lightning_distill.losses.divergence` (the KD
term and the task loss), :mod:`~lightning_distill.losses.feature` (one teacher layer against one student
layer), :mod:`~lightning_distill.losses.ensembles` (several models) and
:mod:`~lightning_distill.losses.transformer` (attention maps, self-attention relations, layer maps and
hidden-state dynamics of transformers) -- and are all importable from here.
A method's own formula lives with its objective (e.g. :func:`lightning_distill.objectives.logit.dkd_loss`).
"""

from lightning_distill.losses.divergence import (
    KL_MODES,
    check_skew,
    check_temperature,
    cross_entropy_loss,
    kd_loss,
    kl_per_position,
)
from lightning_distill.losses.ensembles import (
    confidence_weights,
    multi_teacher_kd_loss,
    mutual_loss,
    self_distillation_loss,
    teacher_mixture_log_probs,
)
from lightning_distill.losses.feature import (
    attention_map,
    attention_transfer_loss,
    cka_loss,
    cosine_feature_loss,
    info_nce_loss,
    linear_cka,
    mse_feature_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    similarity_preserving_loss,
)
from lightning_distill.losses.transformer import (
    KD_POSITIONS,
    LAYER_MAPS,
    attention_kl_loss,
    attention_mse_loss,
    distilbert_loss,
    hidden_state_dynamics_loss,
    relation_kl_loss,
    relation_log_probs,
    resolve_layer_map,
    split_heads,
)

__all__ = [
    "KD_POSITIONS",
    "KL_MODES",
    "LAYER_MAPS",
    "attention_kl_loss",
    "attention_map",
    "attention_mse_loss",
    "attention_transfer_loss",
    "check_skew",
    "check_temperature",
    "cka_loss",
    "confidence_weights",
    "cosine_feature_loss",
    "cross_entropy_loss",
    "distilbert_loss",
    "hidden_state_dynamics_loss",
    "info_nce_loss",
    "kd_loss",
    "kl_per_position",
    "linear_cka",
    "mse_feature_loss",
    "multi_teacher_kd_loss",
    "mutual_loss",
    "relation_kl_loss",
    "relation_log_probs",
    "resolve_layer_map",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "self_distillation_loss",
    "similarity_preserving_loss",
    "split_heads",
    "teacher_mixture_log_probs",
]
