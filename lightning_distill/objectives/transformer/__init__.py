r"""Transformer objectives: TinyBERT, MiniLM / MiniLMv2, DistilBERT's triple loss, hidden-state dynamics.

=========================  ===========================================================================
objective                  method
=========================  ===========================================================================
``TinyBERTLoss``           embedding, hidden-state and attention-map MSE over a layer map
                           (Jiao et al. 2020, arXiv:1909.10351)
``MiniLMLoss``             last-layer attention distributions and value relations (Wang et al. 2020,
                           arXiv:2002.10957); Q-Q / K-K / V-V relations over relation heads, so head
                           counts may differ (MiniLMv2, Wang et al. 2021, arXiv:2012.15828)
``DistilBERTLoss``         MLM + soft-target KL + cosine of the last hidden states (Sanh et al. 2019,
                           arXiv:1910.01108)
``HiddenStateDynamics``    the layer-to-layer change of the hidden states, not only the states
=========================  ===========================================================================

They read what only transformers produce: ``hidden_states`` / ``attentions`` (Hugging Face models are
asked for them automatically, :attr:`~lightning_distill.objectives.base.Objective.model_outputs`) and
the outputs of named query / key / value projections (captured with forward hooks). Layers are compared
through one helper, :class:`LayerMap` (TinyBERT's uniform map, PKD's skip / last maps, an explicit dict or
a learned softmax gate over teacher layers). Trained parts -- projections between widths, the gate --
are created in :meth:`~lightning_distill.objectives.base.Objective.build` from the probed shapes, so they
are optimised and restored from checkpoints like every other objective's. The formulas are the pure
functions of :mod:`lightning_distill.losses.transformer`; all are computed in float32 with padding
(``batch.mask`` False) excluded.
"""

from lightning_distill.objectives.transformer.common import MINILM_RELATIONS, LayerMap
from lightning_distill.objectives.transformer.distilbert import DistilBERTLoss
from lightning_distill.objectives.transformer.dynamics import HiddenStateDynamics
from lightning_distill.objectives.transformer.minilm import MiniLMLoss
from lightning_distill.objectives.transformer.tinybert import TinyBERTLoss

__all__ = ["MINILM_RELATIONS", "DistilBERTLoss", "HiddenStateDynamics", "LayerMap", "MiniLMLoss", "TinyBERTLoss"]
