"""TokenizedTextDataModule and train_tokenizer: tokenizers, collation, masking, packing, splits, errors, training.

Small corpora (the first 30 kB of Python's documentation, six documents), vocabularies of 200 and
sequences of 16-32 tokens keep every test fast.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from _hf import tiny_bert_mlm, tiny_distilbert_mlm, tiny_gpt2  # noqa: E402

from lightning_distill import KnowledgeDistillation  # noqa: E402
from lightning_distill.data import TokenizedTextDataModule, train_tokenizer  # noqa: E402
from lightning_distill.data.tokenized import (  # noqa: E402
    SPECIAL_TOKENS,
    as_pretrained_tokenizer,
    default_documents,
    mask_tokens,
)

CHARS = 30_000
SMALL = dict(vocab_size=200, max_chars=CHARS, val_fraction=0.2, test_fraction=0.2, shuffle_seed=0)


def make_dm(**kwargs) -> TokenizedTextDataModule:
    dm = TokenizedTextDataModule(**{**SMALL, "seq_len": 16, "batch_size": 8, **kwargs})
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return TokenizedTextDataModule(**SMALL)._corpus()


# ------------------------------------------------------------------------------------------------ tokenizers
@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_tokenizer_is_deterministic_round_trips_and_has_its_special_tokens(kind, corpus):
    tokenizers = [train_tokenizer(corpus, vocab_size=200, kind=kind) for _ in range(3)]
    assert all(t.to_str() == tokenizers[0].to_str() for t in tokenizers)  # same text, same settings: same file
    tok = tokenizers[0]
    assert tok.get_vocab_size() == 200
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS.values()] == [0, 1, 2, 3, 4]
    for doc in corpus:
        ids = tok.encode(doc, add_special_tokens=False).ids
        assert 1 not in ids  # no [UNK]: every character of the training text is in the vocabulary
        assert tok.decode(ids, skip_special_tokens=False) == doc  # newlines, indentation, runs of spaces kept
    if kind == "wordpiece":
        pieces = tok.encode("return value").tokens  # BERT-style: a word's first piece, then "##" pieces
        assert [p.startswith("▁") for p in pieces].count(True) == 2 and pieces[0].startswith("▁")
        assert all(p.startswith(("▁", "##")) for p in pieces) and "##" in "".join(pieces)
    wrapped = as_pretrained_tokenizer(tok)
    assert (wrapped.pad_token_id, wrapped.unk_token_id, wrapped.bos_token_id, wrapped.eos_token_id,
            wrapped.mask_token_id) == (0, 1, 2, 3, 4)
    assert wrapped(corpus[0])["input_ids"] == tok.encode(corpus[0]).ids  # no special token added
    assert wrapped.decode(wrapped(corpus[0])["input_ids"]) == corpus[0]


def test_tokenizer_inputs_and_settings(tmp_path):
    file = tmp_path / "corpus.txt"
    file.write_text("alpha beta gamma\nalpha beta\n", encoding="utf-8")
    from_file = train_tokenizer(Path(file), vocab_size=40)
    assert from_file.to_str() == train_tokenizer("alpha beta gamma\nalpha beta\n", vocab_size=40).to_str()
    custom = train_tokenizer(["a b", "b c"], vocab_size=20, special_tokens={"eos_token": "</s>"})
    assert custom.token_to_id("</s>") == 3 and custom.token_to_id("[EOS]") is None
    tiny = train_tokenizer("abcdefghij" * 3, vocab_size=9)  # 5 special tokens + the 4 most frequent characters
    assert tiny.get_vocab_size() == 9 and tiny.encode("j").ids == [1]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(texts="a b", vocab_size=6), ValueError, r"`vocab_size` must be an integer >= 7, got 6"),
        (dict(texts="a b", kind="unigram"), ValueError, r"`kind` must be one of \('bpe', 'wordpiece'\), got 'unigram'"),
        (dict(texts=""), ValueError, "holds no text"),
        (dict(texts=3), TypeError, "must be a str"),
        (dict(texts="a", special_tokens={"sep_token": "[SEP]"}), ValueError, r"unknown roles \['sep_token'\]"),
        (dict(texts="a", special_tokens={"eos_token": "[PAD]"}), ValueError, "distinct non-empty"),
        (dict(texts="a", min_frequency=0), ValueError, "`min_frequency` must be an integer >= 1"),
    ],
)
def test_train_tokenizer_arguments_are_checked(kwargs, error, match):
    with pytest.raises(error, match=match):
        train_tokenizer(**kwargs)


def test_a_str_naming_a_file_is_refused_with_the_fix(tmp_path):
    file = tmp_path / "corpus.txt"
    file.write_text("some text", encoding="utf-8")
    with pytest.raises(ValueError, match=r"names a file.*pathlib\.Path"):
        train_tokenizer(str(file))


# ------------------------------------------------------------------------------------------------ collation
def expected_rows(dm, documents, padded: bool) -> list[list[int]]:
    """Each document encoded, followed by EOS; cut in seq_len pieces (padded) or packed into full blocks."""
    tok, length = dm.tokenizer, dm.seq_len
    pieces = [tok.encode(d, add_special_tokens=False) + [tok.eos_token_id] for d in documents]
    if padded:
        rows = [p[i : i + length] for p in pieces for i in range(0, len(p), length)]
        return [r + [tok.pad_token_id] * (length - len(r)) for r in rows]
    stream = [t for p in pieces for t in p]
    return [stream[i : i + length] for i in range(0, len(stream) - length + 1, length)]


def test_causal_padded_collation_matches_hand_built_rows():
    dm = make_dm(packing=False)
    for split in ("train", "val", "test"):
        ds = getattr(dm, f"{split}_dataset")
        rows = expected_rows(dm, dm.documents[split], padded=True)
        assert len(ds) == len(rows)
        for i, row in enumerate(rows):
            sample = ds[i]
            assert sample["input_ids"].tolist() == row and sample["index"] == i
            real = sample["attention_mask"].bool()
            # Hugging Face's convention: labels repeat the inputs, -100 exactly at padding
            assert torch.equal(sample["labels"][real], sample["input_ids"][real])
            assert (sample["labels"][~real] == -100).all() and (sample["input_ids"][~real] == dm.pad_token_id).all()
    ends = [i for i in range(len(dm.val_dataset)) if not dm.val_dataset[i]["attention_mask"].all()]
    last = dm.val_dataset[ends[0]]
    n = int(last["attention_mask"].sum())
    assert int(last["input_ids"][n - 1]) == dm.tokenizer.eos_token_id  # the document's EOS, then padding
    batch = next(iter(dm.val_dataloader()))
    assert sorted(batch) == ["attention_mask", "index", "input_ids", "labels"]
    assert batch["index"].tolist() == list(range(8))


@pytest.mark.parametrize(("objective", "kind"), [("causal", "bpe"), ("mlm", "wordpiece")])
def test_packing_gives_full_blocks_with_eos_between_documents(objective, kind):
    dm = make_dm(packing=True, objective=objective, tokenizer_kind=kind)
    tok = dm.tokenizer
    for split in ("train", "val", "test"):
        ds, docs = getattr(dm, f"{split}_dataset"), dm.documents[split]
        rows = expected_rows(dm, docs, padded=False)
        assert ds.ids.tolist() == rows and (ds.lengths == dm.seq_len).all()
        batch = next(iter(dm.val_dataloader() if split == "val" else dm.test_dataloader()))
        assert batch["attention_mask"].all() and (batch["input_ids"] != tok.pad_token_id).all()  # no padding at all
    n_eos = int((dm.train_dataset.ids == tok.eos_token_id).sum())
    assert n_eos in (len(dm.documents["train"]), len(dm.documents["train"]) - 1)  # the last may be cut off
    text = tok.decode(dm.train_dataset.ids.flatten())
    space = " " if kind == "wordpiece" else ""  # WordPiece starts every document's first word with a space
    assert text.startswith(dm.documents["train"][0] + "[EOS]" + space + dm.documents["train"][1][:50])
    if objective == "causal":
        assert torch.equal(dm.train_dataset[0]["labels"], dm.train_dataset[0]["input_ids"])


def test_mask_tokens_against_a_hand_built_case():
    ids = torch.arange(10, 30)
    maskable = torch.ones(20, dtype=torch.bool)
    maskable[[0, 19]] = False  # e.g. EOS / padding
    g = torch.Generator().manual_seed(0)
    inputs, labels = mask_tokens(ids, maskable, mask_id=4, random_ids=torch.arange(5, 40), probability=0.25,
                                 generator=g)
    chosen = labels != -100
    assert int(chosen.sum()) == round(0.25 * 18) and not chosen[[0, 19]].any()
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(inputs[~chosen], ids[~chosen])
    none, no_labels = mask_tokens(ids, torch.zeros(20, dtype=torch.bool), 4, torch.arange(5, 40))
    assert torch.equal(none, ids) and (no_labels == -100).all()


@pytest.fixture(scope="module")
def mlm_dm():
    return make_dm(objective="mlm", seq_len=32, packing=False, batch_size=16)


def test_mlm_masks_15_percent_with_the_80_10_10_split(mlm_dm):
    dm, tok = mlm_dm, mlm_dm.tokenizer
    specials = torch.tensor(tok.all_special_ids)
    counts = {"mask": 0, "random": 0, "keep": 0}
    for epoch in range(3):
        for i in range(len(dm.train_dataset)):
            sample, original = dm.train_dataset[(i, epoch)], dm.train_dataset.ids[i]
            labels, inputs = sample["labels"], sample["input_ids"]
            maskable = sample["attention_mask"].bool() & ~torch.isin(original, specials)
            chosen = labels != -100
            assert int(chosen.sum()) == max(1, round(0.15 * int(maskable.sum())))  # BERT: 15 % of the tokens
            assert not (chosen & ~maskable).any()  # never EOS or padding
            assert torch.equal(labels[chosen], original[chosen]) and torch.equal(inputs[~chosen], original[~chosen])
            assert (sample["token_type_ids"] == 0).all()
            counts["mask"] += int((inputs[chosen] == tok.mask_token_id).sum())
            counts["keep"] += int((inputs[chosen] == original[chosen]).sum())
            replaced = (inputs[chosen] != tok.mask_token_id) & (inputs[chosen] != original[chosen])
            counts["random"] += int(replaced.sum())
            assert not torch.isin(inputs[chosen & (inputs != tok.mask_token_id)], specials).any()
    total = sum(counts.values())
    assert total > 3000
    # 80 / 10 / 10 (a random draw equal to the original token, p ~ 1/195, counts as kept)
    for name, share in (("mask", 0.8), ("random", 0.1 * (1 - 1 / 195)), ("keep", 0.1 + 0.1 / 195)):
        assert abs(counts[name] / total - share) < 4 * math.sqrt(share * (1 - share) / total) + 0.005, counts


def test_validation_masks_are_fixed_and_training_masks_change_with_the_epoch(mlm_dm):
    dm = mlm_dm
    first = [b["input_ids"] for b in dm.val_dataloader()]
    second = [b["input_ids"] for b in dm.val_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    again = make_dm(objective="mlm", seq_len=32, packing=False, batch_size=16)  # a new data module, same seeds
    assert all(torch.equal(a, b["input_ids"]) for a, b in zip(first, again.val_dataloader()))
    loader = dm.train_dataloader()
    epoch0 = {int(i): row for b in loader for i, row in zip(b["index"], b["input_ids"])}
    loader.sampler.set_epoch(1)  # what Lightning does at every epoch
    epoch1 = {int(i): row for b in loader for i, row in zip(b["index"], b["input_ids"])}
    assert sorted(epoch0) == sorted(epoch1) == list(range(len(dm.train_dataset)))  # each sample once per epoch
    changed = sum(not torch.equal(epoch0[i], epoch1[i]) for i in epoch0)
    assert changed > 0.9 * len(epoch0)
    assert torch.equal(epoch1[3], dm.train_dataset[(3, 1)]["input_ids"])  # reproducible per (sample, epoch)
    other = make_dm(objective="mlm", seq_len=32, packing=False, batch_size=16, mask_seed=1)
    assert not torch.equal(other.val_dataset[0]["input_ids"], dm.val_dataset[0]["input_ids"])


# ------------------------------------------------------------------------------------------------ splits, index
def test_splits_are_disjoint_deterministic_and_cover_the_corpus(corpus):
    dm = TokenizedTextDataModule(**SMALL)
    dm._load()
    docs = dm.documents
    assert {k: len(v) for k, v in docs.items()} == {"train": 4, "val": 1, "test": 1}
    assert sorted(d for split in docs.values() for d in split) == sorted(corpus)
    assert docs["train"] == [d for d in corpus if d in docs["train"]]  # corpus order within a split
    assert len(corpus) == 6 and sum(map(len, corpus)) == CHARS and corpus[0] == default_documents()[0]
    same = TokenizedTextDataModule(**SMALL)
    same._load()
    assert same.documents == docs
    others = []
    for seed in (1, 2, 3):
        other = TokenizedTextDataModule(**SMALL, split_seed=seed)
        other._load()
        others.append(other.documents)
    assert any(o != docs for o in others)


def test_index_column_and_example_input():
    dm = make_dm()
    seen = []
    for batch in dm.train_dataloader():
        assert torch.equal(batch["input_ids"], dm.train_dataset.ids[batch["index"]])
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(len(dm.train_dataset))) and seen != sorted(seen)  # shuffled, each once
    example = dm.example_input(3)
    assert example["index"].tolist() == [0, 1, 2] and torch.equal(example["input_ids"], dm.train_dataset.ids[:3])
    assert dm.num_classes == dm.vocab_size == len(dm.tokenizer) == 200 and dm.pad_token_id == 0


def test_text_files_and_document_separator(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("one two three.\n\nfour five six.\n\nseven eight.\n", encoding="utf-8")
    b.write_text("nine ten.\r\n\r\neleven twelve.\r\n", encoding="utf-8")  # Windows line endings
    dm = TokenizedTextDataModule(path=[a, str(b)], vocab_size=40, seq_len=4, packing=False, val_fraction=0.2,
                                 test_fraction=0.2, shuffle_seed=0)
    dm.setup()
    assert sorted(d for s in dm.documents.values() for d in s) == sorted(
        ["one two three.", "four five six.", "seven eight.\n", "nine ten.", "eleven twelve.\n"])
    whole = TokenizedTextDataModule(path=[a, b], vocab_size=40, document_separator=None, val_fraction=0.2,
                                    test_fraction=0.2)
    with pytest.raises(ValueError, match=r"has 2 non-empty document\(s\); train, val and test need at least one"):
        whole.setup()


# ------------------------------------------------------------------------------------------------ tokenizers given
def test_a_saved_or_given_tokenizer_is_used_as_is(tmp_path):
    dm = make_dm(objective="mlm")
    dm.save_tokenizer(tmp_path / "tok")
    for source in (tmp_path / "tok", str(tmp_path / "tok"), dm.tokenizer, dm.tokenizer.backend_tokenizer):
        other = make_dm(objective="mlm", tokenizer=source, vocab_size=None)
        assert torch.equal(other.train_dataset.ids, dm.train_dataset.ids)
        assert torch.equal(other.val_dataset[0]["input_ids"], dm.val_dataset[0]["input_ids"])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(objective="clm"), ValueError, r"`objective` must be one of \('causal', 'mlm'\), got 'clm'"),
        (dict(seq_len=1), ValueError, "`seq_len` must be an integer >= 2, got 1"),
        (dict(seq_len=8.0), ValueError, "`seq_len` must be an integer"),
        (dict(packing="yes"), TypeError, "`packing` must be True or False"),
        (dict(batch_size=0), ValueError, "`batch_size` must be an integer >= 1"),
        (dict(val_fraction=0.0), ValueError, r"`val_fraction` must be a finite number in \(0, 1\), got 0.0"),
        (dict(val_fraction=0.5, test_fraction=0.45), ValueError, "at least 10% for training"),
        (dict(max_chars=0), ValueError, "`max_chars` must be an integer >= 1"),
        (dict(document_separator=""), ValueError, "`document_separator` must be a non-empty str or None"),
        (dict(mlm_probability=1.5), ValueError, r"`mlm_probability` must be a finite number in \(0, 1\)"),
        (dict(split_seed=-1), ValueError, "`split_seed` must be an integer >= 0"),
        (dict(mask_seed="a"), ValueError, "`mask_seed` must be an integer"),
        (dict(shuffle_seed=True), TypeError, "`shuffle_seed` must be an integer"),
        (dict(num_workers=-1), ValueError, "`num_workers` must be an integer >= 0"),
        (dict(vocab_size=3), ValueError, "`vocab_size` must be an integer >= 7, got 3"),
        (dict(tokenizer_kind="sentencepiece"), ValueError, r"`tokenizer_kind` must be one of \('bpe', 'wordpiece'\)"),
        (dict(path="no/such/file.txt"), FileNotFoundError, r"`path` 'no/such/file.txt' is not a file"),
        (dict(path=[]), TypeError, "`path` must be a text file, a non-empty list of them or None"),
        (dict(tokenizer="no/such/dir"), FileNotFoundError, r"`tokenizer` 'no/such/dir' is not a directory"),
        (dict(tokenizer=42), TypeError, "`tokenizer` must be None, a directory, a tokenizers.Tokenizer"),
    ],
)
def test_constructor_arguments_are_checked(kwargs, error, match):
    with pytest.raises(error, match=match):
        TokenizedTextDataModule(**kwargs)


def test_errors_found_when_the_data_is_read(tmp_path):
    tok = train_tokenizer("a b c", vocab_size=20)
    with pytest.raises(ValueError, match=r"`vocab_size`=100 applies only when the data module trains the tokenizer"):
        TokenizedTextDataModule(tokenizer=tok, vocab_size=100)
    wrapped = as_pretrained_tokenizer(tok)
    wrapped.mask_token = None
    with pytest.raises(ValueError, match=r"the tokenizer has no mask_token, which objective='mlm' needs"):
        TokenizedTextDataModule(tokenizer=wrapped, objective="mlm", max_chars=CHARS, val_fraction=0.2,
                                test_fraction=0.2).setup()
    with pytest.raises(ValueError, match=r"the train split \(4 document\(s\), \d+ tokens\) holds no full block of "
                                         r"seq_len=20000 tokens: lower seq_len, use packing=False"):
        make_dm(seq_len=20000)
    with pytest.raises(ValueError, match="has 1 non-empty document"):
        make_dm(max_chars=100)


# ------------------------------------------------------------------------------------------------ training
def _trainer(make_trainer):
    return make_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=2, num_sanity_val_steps=0)


def test_gpt2_knowledge_distillation_on_packed_causal_batches(make_trainer):
    dm = TokenizedTextDataModule(**{**SMALL, "seq_len": 32, "batch_size": 8})
    ids = dict(vocab_size=dm.vocab_size, bos_token_id=dm.tokenizer.bos_token_id, eos_token_id=dm.tokenizer.eos_token_id)
    module = KnowledgeDistillation(tiny_gpt2(seed=1, **ids), tiny_gpt2(n_layer=2, n_embd=32, seed=2, **ids),
                                   temperature=2.0, alpha=0.5)
    trainer = _trainer(make_trainer)
    trainer.fit(module, datamodule=dm)
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert math.isfinite(float(trainer.callback_metrics["val/perplexity"]))
    assert module.resolved_label_shift == "next_token" and module.num_classes == dm.vocab_size


def test_bert_teacher_distilbert_student_on_masked_batches(make_trainer):
    dm = TokenizedTextDataModule(**{**SMALL, "seq_len": 32, "batch_size": 8, "objective": "mlm", "packing": False,
                                    "tokenizer_kind": "wordpiece"})
    ids = dict(vocab_size=dm.vocab_size, pad_token_id=dm.pad_token_id)
    module = KnowledgeDistillation(tiny_distilbert_mlm(seed=1, **ids), tiny_bert_mlm(n_layer=2, seed=2, **ids),
                                   temperature=2.0, alpha=0.5)
    trainer = _trainer(make_trainer)
    trainer.fit(module, datamodule=dm)
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert math.isfinite(float(trainer.callback_metrics["val/loss"]))
    assert module.resolved_label_shift == "none"  # labels only at the masked positions, already aligned
