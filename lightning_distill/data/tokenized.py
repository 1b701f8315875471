"""Subword-tokenized text for Hugging Face language models, offline: a local tokenizer and a LightningDataModule.

:func:`train_tokenizer` learns a BPE or WordPiece vocabulary with the ``tokenizers`` library (nothing is
downloaded); :class:`TokenizedTextDataModule` trains one on its training documents (or takes yours), and
yields Hugging Face style dict batches for a causal LM (``labels == input_ids``, the library shifts them
once: ``label_shift``) or a masked LM (BERT's masking, Devlin et al. 2019, arXiv:1810.04805). The default
corpus is Python's documentation (``pydoc_data``, one document per topic), as for
:class:`~lightning_distill.data.TextDataModule`. Needs the ``[hf]`` extra (``transformers``, ``tokenizers``).

Example::

    >>> dm = TokenizedTextDataModule(vocab_size=200, seq_len=16, batch_size=4, max_chars=20_000,
    ...                              val_fraction=0.2, test_fraction=0.2, shuffle_seed=0)
    >>> dm.setup("fit")
    >>> batch = next(iter(dm.train_dataloader()))
    >>> sorted(batch), tuple(batch["input_ids"].shape), dm.vocab_size == dm.num_classes == len(dm.tokenizer)
    (['attention_mask', 'index', 'input_ids', 'labels'], (4, 16), True)
    >>> bool((batch["labels"] == batch["input_ids"]).all())  # packed causal-LM blocks: no padding
    True
    >>> ids = dm.tokenizer("def f(x):\\n    return x")["input_ids"]
    >>> dm.tokenizer.decode(ids)
    'def f(x):\\n    return x'
"""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from lightning_distill.data.common import EpochShuffleSampler, SplitDataModule
from lightning_distill.hf import require
from lightning_distill.validation import check_bool, check_choice, check_float, check_int

__all__ = ["SPECIAL_TOKENS", "TokenBlockDataset", "TokenizedTextDataModule", "as_pretrained_tokenizer",
           "default_documents", "mask_tokens", "train_tokenizer"]

#: the special tokens of a trained tokenizer, by Hugging Face role; they get ids 0 .. 4 in this order
SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "bos_token": "[BOS]", "eos_token": "[EOS]",
                  "mask_token": "[MASK]"}
TOKENIZER_KINDS = ("bpe", "wordpiece")
OBJECTIVES = ("causal", "mlm")
IGNORE_INDEX = -100
_SPACE = "\u2581"  # what SentencePiece-style pre-tokenization writes for a space
_PRIVATE = 0xF0000  # Supplementary Private Use Area-A: stands in for word-internal characters while training
_SPLITS = ("train", "val", "test")
TextSource = Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]]


def default_documents() -> list[str]:
    """Python's documentation topics (``pydoc_data.topics``), one document each, in sorted key order."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def _read(path: Union[str, os.PathLike], argument: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:  # universal newlines: line endings become "\n"
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"`{argument}`: {os.fspath(path)!r} does not exist (cwd: {os.getcwd()!r}).") from None
    except IsADirectoryError:
        raise ValueError(f"`{argument}`: {os.fspath(path)!r} is a directory; pass UTF-8 text files.") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"`{argument}`: {os.fspath(path)!r} is not UTF-8 text ({err}). Convert it to UTF-8.") from None


def _texts(source: TextSource, argument: str = "texts") -> list[str]:
    """Texts from a str (the text itself), a ``Path`` (a file) or a sequence of either."""
    items = [source] if isinstance(source, (str, os.PathLike)) else source
    if not isinstance(items, Iterable):
        raise TypeError(f"`{argument}` must be a str (the text), a pathlib.Path (a file) or a list of them, got "
                        f"{type(source).__name__}.")
    texts = []
    for item in items:
        if isinstance(item, os.PathLike):
            texts.append(_read(item, argument))
        elif isinstance(item, str):
            if "\n" not in item and len(item) < 4096 and os.path.isfile(item):
                raise ValueError(f"`{argument}`: {item!r} names a file, but a str is read as the text itself; pass "
                                 f"pathlib.Path({item!r}) to use the file's contents.")
            texts.append(item)
        else:
            raise TypeError(f"`{argument}` must hold str texts or pathlib.Path files, got {type(item).__name__}.")
    if not any(texts):
        raise ValueError(f"`{argument}` holds no text: a tokenizer needs at least one character to learn from.")
    return texts


def _special_tokens(special_tokens: Optional[Mapping[str, str]]) -> dict[str, str]:
    tokens = dict(SPECIAL_TOKENS)
    if special_tokens is not None:
        if not isinstance(special_tokens, Mapping):
            raise TypeError(f"`special_tokens` must be a dict {{role: token}}, got {type(special_tokens).__name__}.")
        unknown = sorted(set(special_tokens) - set(SPECIAL_TOKENS))
        if unknown:
            raise ValueError(f"`special_tokens` has unknown roles {unknown}; the roles are {tuple(SPECIAL_TOKENS)}.")
        tokens.update(special_tokens)
    if any(not isinstance(t, str) or not t for t in tokens.values()) or len(set(tokens.values())) != len(tokens):
        raise ValueError(f"`special_tokens` must map each role to a distinct non-empty str, got {tokens!r}.")
    return tokens


def _metaspace(prepend: str) -> tuple[Any, Any]:
    tk = require("tokenizers")
    return (tk.pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme=prepend, split=True),
            tk.decoders.Metaspace(replacement=_SPACE, prepend_scheme=prepend, split=True))


def train_tokenizer(
    texts: TextSource,
    vocab_size: int = 1024,
    kind: str = "bpe",
    special_tokens: Optional[Mapping[str, str]] = None,
    min_frequency: int = 2,
) -> Any:
    """Learn a subword vocabulary from ``texts`` with the ``tokenizers`` library; deterministic, offline.

    Words are split at spaces SentencePiece-style (a space becomes ``"\u2581"`` at the start of the next word),
    so newlines, tabs and runs of spaces survive. ``kind="bpe"``: byte-pair merges over characters
    (Sennrich et al. 2016, arXiv:1508.07909); decoding gives back the text exactly. ``kind="wordpiece"``:
    BERT's greedy longest-match tokenization with ``##`` continuation pieces, its vocabulary learned by the
    same frequency merges (as ``tokenizers``' own WordPiece trainer does, which is not deterministic); every
    word starts with ``"\u2581"``, so decoding drops only a leading space of the whole text. Characters are
    kept by frequency (ties by code point) so that the vocabulary never exceeds ``vocab_size``; rarer ones
    become ``[UNK]`` (under WordPiece the whole word does). A literal ``"\u2581"`` decodes as a space.

    Args:
        texts: a str (the text itself), a ``pathlib.Path`` (a UTF-8 file) or a list of either.
        vocab_size: the largest vocabulary, special tokens included (fewer when the text runs out of merges).
        kind: ``"bpe"`` or ``"wordpiece"``.
        special_tokens: ``{role: token}`` overriding :data:`SPECIAL_TOKENS` (ids 0 .. 4 in that order).
        min_frequency: a merge needs a pair seen at least this often.

    Returns:
        a ``tokenizers.Tokenizer``; :func:`as_pretrained_tokenizer` wraps it for ``transformers``.

    Example::

        >>> tok = train_tokenizer("the cat sat on the mat; the cat ate", vocab_size=40)
        >>> tok.encode("the cat").tokens
        ['the', '▁cat']
        >>> tok.token_to_id("[PAD]"), tok.token_to_id("[MASK]")
        (0, 4)
    """
    tk = require("tokenizers")
    specials = list(_special_tokens(special_tokens).values())
    vocab_size = check_int("vocab_size", vocab_size, minimum=len(specials) + 2,
                           hint=" It counts the special tokens and at least two characters.")
    check_choice("kind", kind, TOKENIZER_KINDS)
    min_frequency = check_int("min_frequency", min_frequency, minimum=1)
    wordpiece = kind == "wordpiece"
    pre, decoder = _metaspace("always" if wordpiece else "never")
    words = [w for text in _texts(texts) for w, _ in pre.pre_tokenize_str(text)]
    back: dict[str, str] = {}
    if wordpiece:  # word-internal characters get private stand-ins: plain (deterministic) BPE then learns
        inner = sorted({c for w in words for c in w[1:]})  # which pieces continue a word (WordPiece's "##")
        if any(_PRIVATE <= ord(c) < _PRIVATE + 0x10000 for w in words for c in w):
            raise ValueError("the text holds Private Use Area characters (U+F0000..U+FFFFF), which WordPiece "
                             "training uses internally; remove them or use kind='bpe'.")
        forward = {ord(c): chr(_PRIVATE + i) for i, c in enumerate(inner)}
        back = {chr(_PRIVATE + i): c for i, c in enumerate(inner)}
        words = [w[:1] + w[1:].translate(forward) for w in words]
    counts = collections.Counter(c for w in words for c in w)
    alphabet = sorted(counts, key=lambda c: (-counts[c], c))[: vocab_size - len(specials)]
    tokenizer = tk.Tokenizer(tk.models.BPE(unk_token=specials[1]))
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                     initial_alphabet=alphabet, limit_alphabet=len(alphabet), show_progress=False)
    tokenizer.train_from_iterator(words, trainer)  # one word per item: no pre-tokenizer while training
    if wordpiece:
        vocab: dict[str, int] = {}
        for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            if token not in specials:
                plain = "".join(back.get(c, c) for c in token)
                token = "##" + plain if token[0] in back else plain
            vocab.setdefault(token, len(vocab))
        tokenizer = tk.Tokenizer(tk.models.WordPiece(vocab, unk_token=specials[1], max_input_chars_per_word=10**6))
        tokenizer.add_special_tokens(specials)
        decoder = tk.decoders.Sequence([tk.decoders.WordPiece(prefix="##", cleanup=False),
                                        tk.decoders.Replace(" ", ""), decoder])
    tokenizer.pre_tokenizer, tokenizer.decoder = pre, decoder
    return tokenizer


def as_pretrained_tokenizer(tokenizer: Any, special_tokens: Optional[Mapping[str, str]] = None) -> Any:
    """A ``tokenizers.Tokenizer`` as a ``transformers`` fast tokenizer (``save_pretrained`` / ``AutoTokenizer``).

    The roles of :data:`SPECIAL_TOKENS` (or ``special_tokens``) whose token is in the vocabulary are set;
    no special token is added when encoding, and decoding does not touch spaces around punctuation.
    """
    transformers, tk = require("transformers"), require("tokenizers")
    if isinstance(tokenizer, transformers.PreTrainedTokenizerBase):
        return tokenizer
    if not isinstance(tokenizer, tk.Tokenizer):
        raise TypeError(f"expected a tokenizers.Tokenizer or a transformers tokenizer, got {type(tokenizer).__name__}.")
    roles = {role: t for role, t in _special_tokens(special_tokens).items() if tokenizer.token_to_id(t) is not None}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, clean_up_tokenization_spaces=False,
                                                **roles)


def mask_tokens(ids: Tensor, maskable: Tensor, mask_id: int, random_ids: Tensor, probability: float = 0.15,
                generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """BERT's masked-LM corruption of one sequence (Devlin et al. 2019, arXiv:1810.04805, Sec. 3.1).

    ``max(1, round(probability * n))`` of the ``n`` maskable positions are chosen (uniformly, as BERT's
    data pipeline does); each chosen token becomes ``mask_id`` with probability 0.8, a token drawn
    uniformly from ``random_ids`` with probability 0.1, and stays itself otherwise. Returns
    ``(inputs, labels)``: ``labels`` holds the original token at the chosen positions, -100 elsewhere.
    """
    inputs, labels = ids.clone(), torch.full_like(ids, IGNORE_INDEX)
    candidates = maskable.nonzero().squeeze(1)
    if len(candidates) == 0:
        return inputs, labels
    k = max(1, round(probability * len(candidates)))
    chosen = candidates[torch.randperm(len(candidates), generator=generator)[:k]]
    labels[chosen] = ids[chosen]
    u = torch.rand(k, generator=generator)
    draws = random_ids[torch.randint(len(random_ids), (k,), generator=generator)]
    inputs[chosen[u < 0.8]] = mask_id
    replace = (u >= 0.8) & (u < 0.9)
    inputs[chosen[replace]] = draws[replace]
    return inputs, labels


class TokenBlockDataset(Dataset):
    """Rows of ``seq_len`` token ids (right-padded), as causal-LM or masked-LM samples.

    ``dataset[i]`` is ``{"input_ids", "attention_mask", "labels", ("token_type_ids"), "index": i}``. Causal:
    ``labels`` are the ids with -100 at padding. Masked: :func:`mask_tokens` with a generator seeded by
    ``(mask_seed, split, epoch, i)``; ``dataset[(i, epoch)]`` (what the training loader asks for) masks
    afresh every epoch, ``dataset[i]`` as epoch 0 -- so validation masks never change.
    """

    def __init__(self, ids: Tensor, lengths: Tensor, objective: str = "causal", mlm: Optional[dict[str, Any]] = None,
                 split: int = 0) -> None:
        self.ids, self.lengths, self.objective, self.split = ids, lengths, objective, split
        self.mlm = mlm  # {"mask_id", "special_ids", "random_ids", "probability", "seed"} for objective="mlm"

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key: Union[int, tuple[int, int]]) -> dict[str, Any]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        ids, length = self.ids[index], int(self.lengths[index])
        real = torch.arange(len(ids)) < length
        sample = {"input_ids": ids, "attention_mask": real.long()}
        if self.objective == "causal":
            sample["labels"] = ids.masked_fill(~real, IGNORE_INDEX)
        else:
            m = self.mlm
            seed = (((m["seed"] * 1_000_003 + self.split) * 1_000_003 + epoch) * 1_000_003 + index) % 2**63
            maskable = real & ~torch.isin(ids, m["special_ids"])
            sample["input_ids"], sample["labels"] = mask_tokens(
                ids, maskable, m["mask_id"], m["random_ids"], m["probability"], torch.Generator().manual_seed(seed))
            sample["token_type_ids"] = torch.zeros_like(ids)
        sample["index"] = index
        return sample


class _EpochTaggedSampler(EpochShuffleSampler):
    """:class:`EpochShuffleSampler` yielding ``(index, epoch)``: the training masks change with the epoch."""

    def __iter__(self):
        return ((i, self.epoch) for i in super().__iter__())


class TokenizedTextDataModule(SplitDataModule):
    """Causal-LM or masked-LM batches of subword tokens from Python's documentation or your text files.

    Documents (Python's documentation topics when ``path`` is None; else each file, cut at every
    ``document_separator``) are shuffled by ``split_seed`` and dealt into val / test / train (at least one
    each, the rest kept in corpus order), so no document spans two splits. The tokenizer is trained on
    the training documents only (:func:`train_tokenizer`) unless ``tokenizer`` is given. Each document
    ends with the EOS token. ``packing=True`` concatenates a split's documents into one stream and cuts it
    into full blocks of ``seq_len`` (the incomplete last block is dropped; attention crosses document
    boundaries, as in GPT-2 training); ``packing=False`` cuts each document on its own and right-pads its
    last piece (``attention_mask`` 0, ``labels`` -100 there).

    Batches: ``{"input_ids", "attention_mask", "labels", "index"}`` (``[N, seq_len]`` long, ``index`` the
    sample's position in its split), plus zero ``token_type_ids`` for ``objective="mlm"``.
    ``"causal"``: ``labels == input_ids`` except -100 at padding (Hugging Face's convention; the library
    scores position t against token t + 1, ``label_shift``). ``"mlm"``: :func:`mask_tokens` on every
    non-special token, seeded per sample and epoch (training) or per sample (validation / test: the same
    masks every time).

    Args:
        path: a UTF-8 text file or a list of them; ``None`` uses Python's documentation (offline).
        tokenizer: ``None`` (train one), a directory written by :meth:`save_tokenizer` /
            ``save_pretrained``, a ``tokenizers.Tokenizer`` or a ``transformers`` tokenizer. It needs an EOS
            token, a pad token unless ``packing``, a mask token for ``"mlm"``.
        vocab_size: size of the trained vocabulary (default 1024); only with ``tokenizer=None``.
        tokenizer_kind: ``"bpe"`` (default) or ``"wordpiece"``; only with ``tokenizer=None``.
        objective: ``"causal"`` or ``"mlm"``.
        seq_len: tokens per sample (at most the model's maximum positions).
        packing: full blocks across documents (True) or padded per-document pieces (False).
        batch_size: samples per batch (all splits).
        val_fraction, test_fraction: shares of the documents held out (each split gets at least one).
        max_chars: keep only the first ``max_chars`` characters of the corpus (tests, quick runs).
        document_separator: where files are cut into documents (default: blank lines); ``None``: one
            document per file.
        mlm_probability: share of the tokens the masked LM predicts (BERT: 0.15).
        split_seed: seed of the document split; mask_seed: seed of the masks.
        shuffle_seed: seed of the training order; ``None`` takes the global seed at setup.
        num_workers: DataLoader workers (0 is fastest for this in-memory data).
    """

    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        path: Optional[Union[str, os.PathLike, list]] = None,
        tokenizer: Any = None,
        vocab_size: Optional[int] = None,
        tokenizer_kind: Optional[str] = None,
        objective: str = "causal",
        seq_len: int = 128,
        packing: bool = True,
        batch_size: int = 32,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        max_chars: Optional[int] = None,
        document_separator: Optional[str] = "\n\n",
        mlm_probability: float = 0.15,
        split_seed: int = 0,
        mask_seed: int = 0,
        shuffle_seed: Optional[int] = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        paths = None if path is None else ([path] if isinstance(path, (str, os.PathLike)) else path)
        if paths is not None:
            if not isinstance(paths, (list, tuple)) or not paths or any(not isinstance(p, (str, os.PathLike))
                                                                        for p in paths):
                raise TypeError(f"`path` must be a text file, a non-empty list of them or None, got {path!r}.")
            for p in paths:
                if not os.path.isfile(p):
                    raise FileNotFoundError(
                        f"`path` {os.fspath(p)!r} is not a file (cwd: {os.getcwd()!r}). Pass UTF-8 text files, or "
                        "path=None for Python's built-in documentation text.")
            paths = [os.fspath(p) for p in paths]
        if tokenizer is not None:
            for name, value in (("vocab_size", vocab_size), ("tokenizer_kind", tokenizer_kind)):
                if value is not None:
                    raise ValueError(f"`{name}`={value!r} applies only when the data module trains the tokenizer; "
                                     "drop it, or pass tokenizer=None.")
            if isinstance(tokenizer, (str, os.PathLike)):
                if not os.path.isdir(tokenizer):
                    raise FileNotFoundError(f"`tokenizer` {os.fspath(tokenizer)!r} is not a directory: pass one "
                                            "written by save_tokenizer / save_pretrained, a tokenizer object, or None.")
            elif not isinstance(tokenizer, (require("tokenizers").Tokenizer,
                                            require("transformers").PreTrainedTokenizerBase)):
                raise TypeError(f"`tokenizer` must be None, a directory, a tokenizers.Tokenizer or a transformers "
                                f"tokenizer, got {type(tokenizer).__name__}.")
        else:
            vocab_size = check_int("vocab_size", 1024 if vocab_size is None else vocab_size,
                                   minimum=len(SPECIAL_TOKENS) + 2)
            tokenizer_kind = check_choice("tokenizer_kind", tokenizer_kind or "bpe", TOKENIZER_KINDS)
        self.objective = check_choice("objective", objective, OBJECTIVES)
        self.seq_len = check_int("seq_len", seq_len, minimum=2)
        self.packing = check_bool("packing", packing)
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            check_float(name, value, 0.0, 1.0, low_open=True, high_open=True)
        if val_fraction + test_fraction >= 0.9:
            raise ValueError(f"`val_fraction` + `test_fraction` must leave at least 10% for training, got "
                             f"{val_fraction!r} + {test_fraction!r}.")
        self.max_chars = None if max_chars is None else check_int("max_chars", max_chars, minimum=1)
        if document_separator is not None and (not isinstance(document_separator, str) or not document_separator):
            raise ValueError(f"`document_separator` must be a non-empty str or None, got {document_separator!r}.")
        self.mlm_probability = check_float("mlm_probability", mlm_probability, 0, 1, low_open=True, high_open=True)
        self.split_seed = check_int("split_seed", split_seed, minimum=0)
        self.mask_seed = check_int("mask_seed", mask_seed, minimum=0)
        self.shuffle_seed = None if shuffle_seed is None else check_int("shuffle_seed", shuffle_seed, type_error=True)
        self.num_workers = check_int("num_workers", num_workers, minimum=0)
        self.paths, self.tokenizer_source, self.target_vocab_size = paths, tokenizer, vocab_size
        self.tokenizer_kind, self.document_separator = tokenizer_kind, document_separator
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.documents: Optional[dict[str, list[str]]] = None  # split -> its documents (after _load)
        self._tokenizer: Any = None
        self.train_dataset: Optional[TokenBlockDataset] = None
        self.val_dataset: Optional[TokenBlockDataset] = None
        self.test_dataset: Optional[TokenBlockDataset] = None

    # ------------------------------------------------------------------ corpus, split and tokenizer
    def _corpus(self) -> list[str]:
        if self.paths is None:
            documents = default_documents()
        else:
            documents = []
            for p in self.paths:
                text = _read(p, "path")
                documents += [text] if self.document_separator is None else text.split(self.document_separator)
        kept, budget = [], self.max_chars
        for doc in documents:
            if budget is not None:
                doc, budget = doc[:budget], budget - len(doc[:budget])
            if doc.strip():
                kept.append(doc)
            if budget == 0:
                break
        return kept

    def _load(self) -> None:
        """Read the corpus, split its documents, train or load the tokenizer (no encoding): idempotent."""
        if self.documents is not None:
            return
        docs = self._corpus()
        n = len(docs)
        n_val, n_test = (max(1, round(f * n)) for f in (self.val_fraction, self.test_fraction))
        if n - n_val - n_test < 1:
            where = "Python's documentation" if self.paths is None else f"`path` {self.paths!r}"
            raise ValueError(
                f"the corpus ({where}, max_chars={self.max_chars!r}) has {n} non-empty document(s); train, val and "
                "test need at least one each. Raise or drop max_chars, add files, or cut files into more documents "
                "(document_separator).")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        parts = {"val": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}
        documents = {split: [docs[i] for i in sorted(parts[split])] for split in _SPLITS}
        self._tokenizer = self._resolve_tokenizer(documents["train"])
        self.documents = documents

    def _resolve_tokenizer(self, train_documents: list[str]) -> Any:
        source = self.tokenizer_source
        if source is None:
            source = train_tokenizer(train_documents, self.target_vocab_size, self.tokenizer_kind)
        elif isinstance(source, (str, os.PathLike)):
            source = require("transformers").AutoTokenizer.from_pretrained(os.fspath(source), local_files_only=True)
        tokenizer = as_pretrained_tokenizer(source)
        needs = [("eos_token", "document ends and packing separators")]
        needs += [("pad_token", "padding (packing=False)")] if not self.packing else []
        needs += [("mask_token", "objective='mlm'")] if self.objective == "mlm" else []
        for role, why in needs:
            if getattr(tokenizer, f"{role}_id", None) is None:
                raise ValueError(f"the tokenizer has no {role}, which {why} needs: set one (e.g. tokenizer.{role} = "
                                 f"'[{role[:-6].upper()}]' after adding it) or let the data module train a tokenizer.")
        return tokenizer

    @property
    def tokenizer(self) -> Any:
        """The ``transformers`` fast tokenizer (reads the corpus and trains it on first use)."""
        self._load()
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of token ids (``len(tokenizer)``): the models' ``vocab_size``."""
        return len(self.tokenizer)

    @property
    def num_classes(self) -> int:
        """Same as :attr:`vocab_size`: every token id is a class."""
        return self.vocab_size

    @property
    def pad_token_id(self) -> Optional[int]:
        """The tokenizer's padding id (the models' ``pad_token_id``)."""
        return self.tokenizer.pad_token_id

    def save_tokenizer(self, directory: Union[str, os.PathLike]) -> Path:
        """Write the tokenizer where ``AutoTokenizer.from_pretrained(directory)`` reads it; returns the directory."""
        self.tokenizer.save_pretrained(os.fspath(directory))
        return Path(directory)

    # ------------------------------------------------------------------ samples
    def _blocks(self, documents: list[str], split: str) -> TokenBlockDataset:
        tok, length = self._tokenizer, self.seq_len
        encoded = tok(documents, add_special_tokens=False)["input_ids"]
        pieces = [torch.tensor(ids + [tok.eos_token_id]) for ids in encoded]
        if self.packing:
            stream = torch.cat(pieces)
            n_blocks = len(stream) // length
            ids, lengths = stream[: n_blocks * length].view(n_blocks, length), torch.full((n_blocks,), length)
        else:
            rows, lens = [], []
            for piece in pieces:
                n = -(-len(piece) // length)
                padding = piece.new_full((n * length - len(piece),), tok.pad_token_id)
                rows.append(torch.cat([piece, padding]).view(n, length))
                lens += [length] * (n - 1) + [len(piece) - (n - 1) * length]
            ids, lengths = torch.cat(rows), torch.tensor(lens)
        if len(ids) == 0:
            more = "raise or drop max_chars" + ("" if split == "train" else f", raise {split}_fraction")
            raise ValueError(
                f"the {split} split ({len(documents)} document(s), {sum(len(p) for p in pieces)} tokens) holds no "
                f"full block of seq_len={length} tokens: lower seq_len, use packing=False, or {more}.")
        mlm = None
        if self.objective == "mlm":
            special = torch.tensor(sorted(set(tok.all_special_ids)), dtype=torch.long)
            vocab = torch.arange(len(tok))
            mlm = {"mask_id": tok.mask_token_id, "special_ids": special, "probability": self.mlm_probability,
                   "random_ids": vocab[~torch.isin(vocab, special)], "seed": self.mask_seed}
        return TokenBlockDataset(ids, lengths, self.objective, mlm, _SPLITS.index(split))

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_dataset is not None:
            return
        self._load()
        self.train_dataset, self.val_dataset, self.test_dataset = (self._blocks(self.documents[s], s) for s in _SPLITS)
        self.resolve_shuffle_seed()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                          sampler=_EpochTaggedSampler(self.train_dataset, seed=self.shuffle_seed),
                          persistent_workers=self.num_workers > 0)

    def example_input(self, n: int = 2) -> dict[str, Tensor]:
        """The first ``n`` training samples as a batch (epoch-0 masks), to probe the models before training."""
        self.setup()
        return default_collate([self.train_dataset[i] for i in range(min(n, len(self.train_dataset)))])
