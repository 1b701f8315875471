"""Character-level language-modelling data: a tokenizer, a chunk dataset and a LightningDataModule.

The default corpus is Python's own documentation text (``pydoc_data.topics``, part of the
standard library: about 465,000 characters, offline, no download). Any UTF-8 text file works
too. Batches are ``(input, target, index, mask)``: next-character prediction, ``target`` is
``input`` shifted by one position, ``mask`` is True at the positions that have a target.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_distill.data.common import SplitDataModule, check_positive_int

__all__ = ["CharTokenizer", "TextDataModule", "TokenChunkDataset", "default_corpus"]

_SPLITS = ("train", "val", "test")


def default_corpus() -> str:
    """Python's documentation topics (``pydoc_data.topics.topics``) as one text.

    The topics are joined in sorted key order with a blank line between them, so the text is
    the same on every run of a given Python version (it changes slightly between versions).

    Example::

        >>> len(default_corpus()) > 400_000
        True
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


class CharTokenizer:
    """One id per character of a text, plus ``<unk>`` for characters unseen at build time.

    Id 0 is ``<unk>`` (also used to pad inputs); the characters of ``text``, sorted by code
    point, get ids ``1 .. vocab_size - 1``. The vocabulary depends only on the *set* of
    characters, so two tokenizers built from texts with the same characters are identical.
    Unknown characters encode to 0 and id 0 decodes to ``unk_char`` (U+FFFD by default).

    Args:
        text: the text whose characters make up the vocabulary (non-empty).

    Example::

        >>> tok = CharTokenizer("hello world")
        >>> tok.vocab_size  # 8 distinct characters + <unk>
        9
        >>> ids = tok.encode("hello")
        >>> ids.tolist()
        [4, 3, 5, 5, 6]
        >>> tok.decode(ids)
        'hello'
        >>> tok.decode(tok.encode("help!")) == "hel" + 2 * tok.unk_char  # 'p', '!' are unknown
        True
        >>> CharTokenizer.from_state_dict(tok.state_dict()).encode("world").tolist()
        [8, 6, 7, 5, 2]
    """

    unk_id = 0
    pad_id = 0
    unk_char = "\ufffd"

    def __init__(self, text: str) -> None:
        if not isinstance(text, str):
            raise TypeError(f"`text` must be a str, got {type(text).__name__}. Read the file first (open(...).read()).")
        if not text:
            raise ValueError("`text` is empty: a tokenizer needs at least one character to build its vocabulary.")
        self.chars: list[str] = sorted(set(text))
        self._stoi = {ch: i + 1 for i, ch in enumerate(self.chars)}
        self._itos = [self.unk_char, *self.chars]
        # sorted code points, for a vectorised encode (torch.searchsorted)
        self._codes = torch.tensor([ord(ch) for ch in self.chars], dtype=torch.int64)

    @property
    def vocab_size(self) -> int:
        """Number of ids: the distinct characters plus ``<unk>``."""
        return len(self.chars) + 1

    def encode(self, text: str) -> Tensor:
        """``text`` as a 1-D ``LongTensor`` of ids (unknown characters -> ``unk_id``)."""
        if not isinstance(text, str):
            raise TypeError(f"`text` must be a str, got {type(text).__name__}.")
        if not text:
            return torch.zeros(0, dtype=torch.long)
        codes = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32).long()
        pos = torch.searchsorted(self._codes, codes).clamp_max(len(self.chars) - 1)
        known = self._codes[pos] == codes
        return torch.where(known, pos + 1, torch.full_like(pos, self.unk_id))

    def decode(self, ids: Union[Tensor, Iterable[int]]) -> str:
        """The text of a 1-D sequence of ids (a tensor or a list of ints)."""
        if isinstance(ids, Tensor):
            if ids.ndim > 1:
                raise ValueError(
                    f"`ids` must be 1-D, got shape {tuple(ids.shape)}; decode one row at a time "
                    "([tok.decode(row) for row in ids])."
                )
            ids = ids.tolist()
        out = []
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(
                    f"id {i!r} is outside the vocabulary (valid ids: 0 .. {self.vocab_size - 1}); drop "
                    "padding / ignore_index positions (use the batch's mask) before decoding."
                )
            out.append(self._itos[i])
        return "".join(out)

    def state_dict(self) -> dict[str, Any]:
        """Plain Python types (JSON / YAML / ``torch.load(weights_only=True)`` friendly)."""
        return {"chars": "".join(self.chars)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "CharTokenizer":
        """Rebuild the tokenizer saved by :meth:`state_dict`."""
        if not isinstance(state, dict) or not isinstance(state.get("chars"), str):
            raise ValueError(
                f"expected a dict with a 'chars' string (from CharTokenizer.state_dict()), got {state!r:.200}."
            )
        return cls(state["chars"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and self.chars == other.chars

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class TokenChunkDataset(Dataset):
    """Non-overlapping chunks of ``seq_len + 1`` ids from a 1-D id tensor, as next-token samples.

    Chunk ``i`` covers ``ids[i * (seq_len + 1) : (i + 1) * (seq_len + 1)]``; its sample is
    ``(chunk[:-1], chunk[1:], i, mask)``. A final shorter chunk (at least 2 ids) is kept and
    right-padded: ``pad_id`` in the input, ``ignore_index`` in the target, ``mask`` False there.
    A final lone id has nothing to predict and is left out.

    Attributes:
        inputs: ``[num_chunks, seq_len]`` long.
        targets: ``[num_chunks, seq_len]`` long (``ignore_index`` at padding).
        mask: ``[num_chunks, seq_len]`` bool, True where ``targets`` is a real id.
        starts: ``[num_chunks]`` position of each chunk's first id in ``ids``.

    Example::

        >>> ds = TokenChunkDataset(torch.arange(1, 11), seq_len=3)  # 10 ids -> chunks of 4, 4, 2
        >>> len(ds)
        3
        >>> x, y, index, mask = ds[2]
        >>> x.tolist(), y.tolist(), index, mask.tolist()
        ([9, 0, 0], [10, -100, -100], 2, [True, False, False])
    """

    def __init__(self, ids: Tensor, seq_len: int, pad_id: int = 0, ignore_index: int = -100) -> None:
        check_positive_int("seq_len", seq_len)
        if not isinstance(ids, Tensor) or ids.ndim != 1:
            raise ValueError(f"`ids` must be a 1-D tensor, got {type(ids).__name__} {getattr(ids, 'shape', '')}.")
        ids = ids.long()
        span = seq_len + 1
        n_full, rest = divmod(len(ids), span)
        chunks = ids[: n_full * span].view(n_full, span)
        inputs, targets = chunks[:, :-1], chunks[:, 1:]
        mask = torch.ones(n_full, seq_len, dtype=torch.bool)
        if rest >= 2:
            tail = ids[n_full * span :]
            x = torch.full((1, seq_len), pad_id, dtype=torch.long)
            y = torch.full((1, seq_len), ignore_index, dtype=torch.long)
            m = torch.zeros(1, seq_len, dtype=torch.bool)
            x[0, : rest - 1], y[0, : rest - 1], m[0, : rest - 1] = tail[:-1], tail[1:], True
            inputs, targets, mask = torch.cat([inputs, x]), torch.cat([targets, y]), torch.cat([mask, m])
        self.seq_len = seq_len
        self.inputs = inputs.contiguous()
        self.targets = targets.contiguous()
        self.mask = mask
        self.starts = torch.arange(len(self.inputs), dtype=torch.long) * span

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int, Tensor]:
        return self.inputs[index], self.targets[index], index, self.mask[index]


class TextDataModule(SplitDataModule):
    """Character-level next-token prediction on a text file or on Python's documentation.

    The corpus (Python's documentation topics when ``path`` is None, see :func:`default_corpus`,
    about 465,000 characters) is cut into three contiguous spans -- train, val, test, in that order,
    sized by the fractions -- and each span into non-overlapping chunks of ``seq_len + 1``
    characters (a final short chunk is padded, not dropped). Batches are
    ``(input, target, index, mask)`` with ``input`` and ``target`` ``[N, seq_len]`` long,
    ``target[:, t] == input[:, t + 1]``, ``index`` the chunk's position in its split and ``mask``
    ``[N, seq_len]`` bool (False only at the padding of a last short chunk, where ``input`` is
    ``pad_id`` = 0 and ``target`` is ``ignore_index`` = -100).

    The :class:`CharTokenizer` is built on the whole file, *before* ``max_chars`` truncation, so
    val / test characters are known and a quick run with ``max_chars`` has the same vocabulary and
    ids as the full run (a teacher trained on one works with the other).

    Args:
        path: a UTF-8 text file; ``None`` uses Python's documentation text (offline). Line endings
            are normalised to ``\\n``.
        seq_len: characters per sample (the model's context length must be at least this).
        batch_size: samples per batch (all splits).
        val_fraction: share of the corpus held out for validation (taken after the train span).
        test_fraction: share of the corpus held out for the final test (the end of the corpus).
        max_chars: keep only the first ``max_chars`` characters (tests and quick runs); ``None``
            keeps all.
        shuffle_seed: seed of the training order; ``None`` takes the global seed at setup time
            (``seed_everything``), as in :class:`~lightning_distill.data.DigitsDataModule`.
        num_workers: DataLoader workers; 0 is fastest for this in-memory dataset.

    Example::

        >>> dm = TextDataModule(seq_len=32, batch_size=4, max_chars=20_000, shuffle_seed=0)
        >>> dm.setup("fit")
        >>> x, y, index, mask = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), tuple(mask.shape), x.dtype, mask.dtype
        ((4, 32), (4, 32), torch.int64, torch.bool)
        >>> dm.vocab_size == dm.num_classes == dm.tokenizer.vocab_size
        True
        >>> len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)
        (546, 31, 31)
    """

    ignore_index = -100
    pad_id = CharTokenizer.pad_id

    def __init__(
        self,
        path: Optional[str] = None,
        seq_len: int = 128,
        batch_size: int = 32,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        max_chars: Optional[int] = None,
        shuffle_seed: Optional[int] = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if path is not None:
            if not isinstance(path, (str, os.PathLike)):
                raise TypeError(f"`path` must be a file path (str) or None, got {type(path).__name__}: {path!r}.")
            path = os.fspath(path)
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"`path` {path!r} does not exist (cwd: {os.getcwd()!r}). Pass an existing UTF-8 text "
                    "file, or path=None for Python's built-in documentation text."
                )
            if os.path.isdir(path):
                raise ValueError(f"`path` {path!r} is a directory; pass one UTF-8 text file.")
        check_positive_int("seq_len", seq_len)
        check_positive_int("batch_size", batch_size)
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                raise ValueError(f"`{name}` must be in (0, 1), got {value!r}.")
        if val_fraction + test_fraction >= 0.9:
            raise ValueError(
                f"`val_fraction` + `test_fraction` must leave at least 10% for training, got "
                f"{val_fraction!r} + {test_fraction!r}."
            )
        if max_chars is not None:
            check_positive_int("max_chars", max_chars)
        if shuffle_seed is not None and (isinstance(shuffle_seed, bool) or not isinstance(shuffle_seed, int)):
            raise TypeError(f"`shuffle_seed` must be an int or None, got {shuffle_seed!r}.")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"`num_workers` must be an integer >= 0, got {num_workers!r}.")
        self.path = path
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.max_chars = max_chars
        self.shuffle_seed = shuffle_seed
        self.num_workers = num_workers
        self.text: Optional[str] = None
        self.spans: Optional[dict[str, tuple[int, int]]] = None
        self._tokenizer: Optional[CharTokenizer] = None
        self.train_dataset: Optional[TokenChunkDataset] = None
        self.val_dataset: Optional[TokenChunkDataset] = None
        self.test_dataset: Optional[TokenChunkDataset] = None

    # ------------------------------------------------------------------ corpus and vocabulary
    def _read(self) -> str:
        if self.path is None:
            return default_corpus()
        try:
            with open(self.path, encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"`path` {self.path!r} does not exist (any more).") from None
        except UnicodeDecodeError as err:
            raise ValueError(
                f"`path` {self.path!r} is not UTF-8 text ({err}). Convert it to UTF-8 "
                "(e.g. `iconv -f latin1 -t utf-8`)."
            ) from None

    def _load(self) -> None:
        """Read the corpus and build the tokenizer (no split, no seed): cheap, idempotent."""
        if self.text is not None:
            return
        text = self._read()
        where = "Python's documentation text" if self.path is None else f"`path` {self.path!r}"
        if not text:
            raise ValueError(f"the corpus is empty: {where} has no characters. Pass a non-empty text file.")
        tokenizer = CharTokenizer(text)
        if self.max_chars is not None:
            text = text[: self.max_chars]
        n = len(text)
        n_val, n_test = round(self.val_fraction * n), round(self.test_fraction * n)
        sizes = {"train": n - n_val - n_test, "val": n_val, "test": n_test}
        for split, size in sizes.items():
            if size < 2:
                fraction = "1 - val_fraction - test_fraction" if split == "train" else f"{split}_fraction"
                raise ValueError(
                    f"the {split} split gets {size} character(s) of the {n:,} in the corpus ({where}, "
                    f"max_chars={self.max_chars!r}); it needs at least 2 to hold one chunk (one input and "
                    f"its next character). Raise {fraction}, raise or drop max_chars, or use a longer text."
                )
        bounds, start = {}, 0
        for split in _SPLITS:
            bounds[split] = (start, start + sizes[split])
            start += sizes[split]
        self._tokenizer, self.spans, self.text = tokenizer, bounds, text

    @property
    def tokenizer(self) -> CharTokenizer:
        """The :class:`CharTokenizer` of the corpus (reads the corpus on first use)."""
        self._load()
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of token ids (characters + ``<unk>``): the model's ``vocab_size``."""
        return self.tokenizer.vocab_size

    @property
    def num_classes(self) -> int:
        """Same as :attr:`vocab_size`: every token id is a class of the next-token prediction."""
        return self.vocab_size

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_dataset is not None:
            return
        self._load()
        ids = self._tokenizer.encode(self.text)
        datasets = {
            split: TokenChunkDataset(ids[a:b], self.seq_len, pad_id=self.pad_id, ignore_index=self.ignore_index)
            for split, (a, b) in self.spans.items()
        }
        self.train_dataset, self.val_dataset, self.test_dataset = (datasets[s] for s in _SPLITS)
        self.resolve_shuffle_seed()

    def example_input(self, n: int = 2) -> Tensor:
        """The first ``n`` training inputs (``[n, seq_len]`` long), to probe model shapes before training."""
        self.setup()
        return self.train_dataset.inputs[:n]
