"""Data-free distillation: synthesise a transfer set from the teacher alone (DeepInversion).

DeepInversion (Yin et al., CVPR 2020, "Dreaming to Distill: Data-free Knowledge Transfer via
DeepInversion", arXiv:1912.08795) optimises a batch of random inputs ``x̂`` so that a frozen
teacher ``f`` (in eval mode) classifies them as chosen targets ``y`` *and* so that the
activations they produce have the statistics stored in the teacher's BatchNorm layers::

    min_x̂  ce_weight · CE(f(x̂), y)
         + bn_weight · R_feature(x̂)
         + tv_weight · R_TV(x̂) + l2_weight · R_ℓ2(x̂)

    R_feature(x̂) = Σ_l w_l ( ||μ_l(x̂) − μ_l^BN||₂ + ||σ²_l(x̂) − σ²_l^BN||₂ )

where ``μ_l(x̂)`` / ``σ²_l(x̂)`` are the per-channel batch mean and (biased) variance of the
*input* of BatchNorm layer ``l`` and ``μ_l^BN`` / ``σ²_l^BN`` its ``running_mean`` /
``running_var``. The saved inputs are then a transfer set: train a student on them with any
strategy (e.g. :class:`~lightning_distill.KnowledgeDistillation`), which only needs inputs.

From the command line (defaults tuned for the shipped digits teacher: 2,000 samples in about
40 s on a busy 2-core CPU, all 2,000 classified by the teacher as their target)::

    python -m lightning_distill.data_free --teacher-model digits_cnn --teacher zoo:digits_cnn \\
        --num-classes 10 --input-shape 1 8 8 --num-samples 2000 --out data/digits_deepinversion.pt

The command line runs torch with one intra-op thread (``--num-threads``): the tensors of one
step are tiny and extra threads made each step 10-30x slower on a shared 2-core machine. From
Python, call ``torch.set_num_threads(1)`` yourself for small CPU teachers.

The file is a ``torch.save`` dict of plain tensors and Python values -- ``"inputs"``
(``[num_samples, *input_shape]``), ``"targets"``, ``"teacher_acc"``, ``"loss_history"``,
``"meta"`` -- readable with ``torch.load(path, weights_only=True)`` (see
:func:`load_transfer_set`); code that reads unlabeled arrays uses its ``"inputs"`` key.

The package, one concept a module:

* :mod:`~lightning_distill.data_free.priors` -- the BatchNorm-statistics prior
  (:class:`BNStatisticsHook`, :func:`bn_statistics_loss`) and the image priors
  (:func:`total_variation_prior`, :func:`input_l2_prior`);
* :mod:`~lightning_distill.data_free.options` -- the checked options of one run;
* :mod:`~lightning_distill.data_free.synthesis` -- :func:`deep_inversion`, the optimisation;
* :mod:`~lightning_distill.data_free.files` -- :func:`save_transfer_set` (atomic) and
  :func:`load_transfer_set` (``weights_only``);
* :mod:`~lightning_distill.data_free.cli` -- :func:`main`, the command line, whose flags are
  derived from :func:`deep_inversion`'s signature and docstring.
"""

from lightning_distill.data_free.cli import main
from lightning_distill.data_free.files import load_transfer_set, save_transfer_set
from lightning_distill.data_free.priors import (
    BNStatisticsHook,
    bn_statistics_loss,
    input_l2_prior,
    total_variation_prior,
)
from lightning_distill.data_free.synthesis import deep_inversion

__all__ = [
    "BNStatisticsHook",
    "bn_statistics_loss",
    "deep_inversion",
    "input_l2_prior",
    "load_transfer_set",
    "main",
    "save_transfer_set",
    "total_variation_prior",
]
