"""A tiny decoder-only (GPT-style) causal transformer for character-level language modelling.

Made for :class:`~lightning_distill.data.text.TextDataModule`: inputs are ``[N, L]`` token ids,
``forward`` returns next-token logits ``[N, L, vocab_size]``. The transformer blocks live in the
``nn.ModuleList`` ``blocks``, and each block returns a plain ``[N, L, d_model]`` tensor, so
feature strategies hook hidden states by name (``blocks.0``, ``blocks.1``, ...; see
``stage_names``). Padding needs no attention mask: attention is causal, so right padding never
reaches a valid position, and padded targets are dropped by the loss (``ignore_index`` / mask).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_distill.validation import check_int

__all__ = ["CharTransformer"]


class _CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        n, length, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        # [N, L, D] -> [N, H, L, D/H]
        q, k, v = (t.view(n, length, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(n, length, d)))


class _Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, d_model: int, n_heads: int, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = _CausalSelfAttention(d_model, n_heads, dropout)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, ffn_mult * d_model),
            nn.GELU(),
            nn.Linear(ffn_mult * d_model, d_model),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CharTransformer(nn.Module):
    """Token + learned position embeddings, ``n_layers`` pre-LN causal blocks, ``ln_f``, ``head``.

    Weights are initialised as in GPT-2: normal(0, 0.02) for linear layers and embeddings, zero
    biases, and the residual output projections (``attn.proj``, ``mlp.2``) scaled by
    ``1 / sqrt(2 * n_layers)``. The module draws from the global RNG at construction only, so
    ``torch.manual_seed`` before building gives the same weights.

    Named submodules: ``tok_emb``, ``pos_emb``, ``drop``, ``blocks`` (``blocks.0`` ...), ``ln_f``,
    ``head``. Hooks on ``blocks.i`` see the residual stream ``[N, L, d_model]`` after block ``i``.

    Args:
        vocab_size: number of token ids (``TextDataModule.vocab_size``); logits have this size.
        d_model: width of the residual stream; must be divisible by ``n_heads``.
        n_layers: number of transformer blocks.
        n_heads: attention heads per block.
        max_len: longest input accepted (size of the position embedding); at least the
            datamodule's ``seq_len``.
        dropout: dropout on embeddings, attention weights and residual branches (0 disables it).
        ffn_mult: hidden width of the MLP as a multiple of ``d_model``.

    Token ids are not range-checked (that would synchronise GPU runs): ids must lie in
    ``0 .. vocab_size - 1``.

    Example::

        >>> import torch
        >>> model = CharTransformer(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_len=64)
        >>> model(torch.zeros(2, 16, dtype=torch.long)).shape
        torch.Size([2, 16, 50])
        >>> model.stage_names
        ('blocks.0', 'blocks.1')
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        max_len: int = 256,
        dropout: float = 0.0,
        ffn_mult: int = 4,
    ) -> None:
        super().__init__()
        for name, value in (
            ("vocab_size", vocab_size),
            ("d_model", d_model),
            ("n_layers", n_layers),
            ("n_heads", n_heads),
            ("max_len", max_len),
            ("ffn_mult", ffn_mult),
        ):
            check_int(name, value, minimum=1)
        if d_model % n_heads:
            divisors = [h for h in range(1, d_model + 1) if d_model % h == 0]
            raise ValueError(
                f"`d_model` ({d_model!r}) must be divisible by `n_heads` ({n_heads!r}): each head gets "
                f"d_model / n_heads dimensions. Valid n_heads for d_model={d_model}: {divisors}; or change d_model."
            )
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be a probability in [0, 1), got {dropout!r}.")
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.max_len = max_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, ffn_mult, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.apply(self._init_weights)
        for block in self.blocks:  # GPT-2: residual projections scaled by 1/sqrt(2 * n_layers)
            for proj in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def stage_names(self) -> tuple[str, ...]:
        """Names of the hookable blocks, ``("blocks.0", ..., f"blocks.{n_layers - 1}")``."""
        return tuple(f"blocks.{i}" for i in range(len(self.blocks)))

    def forward(self, input_ids: Tensor) -> Tensor:
        """Next-token logits ``[N, L, vocab_size]`` for token ids ``[N, L]`` (``L <= max_len``)."""
        if not isinstance(input_ids, Tensor):
            raise TypeError(f"`input_ids` must be a LongTensor [N, L], got {type(input_ids).__name__}.")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(
                f"`input_ids` must hold integer token ids, got dtype {input_ids.dtype}; "
                "encode text with the datamodule's tokenizer (a LongTensor)."
            )
        if input_ids.ndim != 2:
            raise ValueError(
                f"`input_ids` must be [N, L] (a batch of sequences), got shape {tuple(input_ids.shape)}; "
                "add a batch dimension with input_ids[None] for one sequence."
            )
        length = input_ids.shape[1]
        if length > self.max_len:
            raise ValueError(
                f"input length {length} is longer than max_len={self.max_len} of the position embedding. "
                f"Use sequences of at most {self.max_len} tokens (the datamodule's seq_len) or build the "
                f"model with max_len >= {length}."
            )
        pos = torch.arange(length, device=input_ids.device)
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))
