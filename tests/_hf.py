"""Tiny Hugging Face models and batches in Hugging Face's own conventions, for the tests.

Models are built from config objects (random init, no download; extra keyword arguments go to the config).
Batches are dicts ``{"input_ids", "attention_mask", "labels"}`` of right-padded sequences of different lengths:

* causal LM: ``labels == input_ids`` with ``-100`` at padding (what ``DataCollatorForLanguageModeling(mlm=False)``
  yields; the model's logits at position t predict token t + 1);
* masked LM: ``labels`` ``-100`` except at the masked positions, whose input is the ``[MASK]`` id.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

VOCAB = 40
PAD, MASK = 0, 1


def tiny_gpt2(n_layer: int = 1, n_embd: int = 16, vocab_size: int = VOCAB, dropout: float = 0.1, seed: int = 0,
              **config):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=32, n_embd=n_embd, n_layer=n_layer, n_head=2,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, **{"pad_token_id": PAD, **config},
    )
    return GPT2LMHeadModel(config)


def tiny_bert_mlm(n_layer: int = 1, hidden: int = 16, vocab_size: int = VOCAB, seed: int = 0, **config):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=n_layer, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=32, type_vocab_size=2, **{"pad_token_id": PAD, **config},
    )
    return BertForMaskedLM(config)


def tiny_distilbert_mlm(n_layers: int = 1, dim: int = 16, vocab_size: int = VOCAB, seed: int = 0, **config):
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    torch.manual_seed(seed)
    config = DistilBertConfig(
        vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=2, hidden_dim=2 * dim,
        max_position_embeddings=32, **{"pad_token_id": PAD, **config},
    )
    return DistilBertForMaskedLM(config)


def causal_lm_batches(n: int = 32, length: int = 12, vocab_size: int = VOCAB, seed: int = 0) -> list[dict]:
    """Samples of a learnable toy language (each token is the previous one + 1, wrapping), lengths 6..length."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        real = int(torch.randint(6, length + 1, (), generator=g))
        start = int(torch.randint(2, vocab_size, (), generator=g))
        tokens = 2 + (start - 2 + torch.arange(real)) % (vocab_size - 2)
        ids = torch.full((length,), PAD)
        ids[:real] = tokens
        mask = torch.zeros(length, dtype=torch.long)
        mask[:real] = 1
        labels = ids.masked_fill(mask == 0, -100)
        samples.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return samples


def masked_lm_batches(n: int = 32, length: int = 12, vocab_size: int = VOCAB, seed: int = 0) -> list[dict]:
    """The same toy language with 25 % of the real tokens replaced by [MASK]; labels only there."""
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for sample in causal_lm_batches(n, length, vocab_size, seed):
        ids, mask = sample["input_ids"].clone(), sample["attention_mask"]
        chosen = (torch.rand(length, generator=g) < 0.25) & (mask == 1)
        chosen[0] = True  # at least one
        labels = torch.full_like(ids, -100)
        labels[chosen] = ids[chosen]
        ids[chosen] = MASK
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids), "labels": labels})
    return out


class HFDictDataModule(L.LightningDataModule):
    """Training / validation loaders of Hugging Face style dict batches."""

    def __init__(self, kind: str = "causal", batch_size: int = 8, n: int = 32) -> None:
        super().__init__()
        make = causal_lm_batches if kind == "causal" else masked_lm_batches
        self.train_samples, self.val_samples = make(n, seed=0), make(max(n // 2, 8), seed=1)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_samples, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_samples, batch_size=self.batch_size)
