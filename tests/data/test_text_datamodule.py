"""TextDataModule / CharTokenizer: offline corpus, contiguous splits, shifted targets, padding, errors, order."""

from __future__ import annotations

import pytest
import torch

from lightning_distill.data.text import CharTokenizer, TextDataModule, TokenChunkDataset, default_corpus


@pytest.fixture(scope="module")
def full_dm():
    dm = TextDataModule(shuffle_seed=0)  # the default corpus, seq_len 128
    dm.setup()
    return dm


def splits(dm):
    return {"train": dm.train_dataset, "val": dm.val_dataset, "test": dm.test_dataset}


def test_default_corpus_is_offline_python_docs(full_dm):
    from pydoc_data.topics import topics

    text = default_corpus()
    assert len(text) > 400_000 and text == full_dm.text
    assert text.startswith(topics[sorted(topics)[0]])
    assert full_dm.num_classes == full_dm.vocab_size == full_dm.tokenizer.vocab_size == len(set(text)) + 1
    x = full_dm.example_input()
    assert x.shape == (2, 128) and x.dtype == torch.long


def test_splits_are_contiguous_disjoint_and_in_order(full_dm):
    spans, n = full_dm.spans, len(full_dm.text)
    assert list(spans) == ["train", "val", "test"]
    assert spans["train"][0] == 0 and spans["test"][1] == n
    assert spans["train"][1] == spans["val"][0] and spans["val"][1] == spans["test"][0]
    assert spans["val"][1] - spans["val"][0] == round(0.05 * n) == spans["test"][1] - spans["test"][0]
    # each split's chunks tile its span: 129 characters each, the last one shorter (and padded)
    for name, ds in splits(full_dm).items():
        a, b = spans[name]
        assert len(ds) == (b - a) // 129 + ((b - a) % 129 >= 2)
        assert torch.equal(ds.starts, torch.arange(len(ds)) * 129)


def test_target_is_the_input_shifted_by_one_in_the_raw_text(full_dm):
    tok, text = full_dm.tokenizer, full_dm.text
    for name, ds in splits(full_dm).items():
        offset = full_dm.spans[name][0]
        for i in (0, 1, len(ds) // 2, len(ds) - 2):
            x, y, index, mask = ds[i]
            start = offset + int(ds.starts[i])
            assert index == i and bool(mask.all())
            assert tok.decode(x) == text[start : start + 128]
            assert tok.decode(y) == text[start + 1 : start + 129]
            assert torch.equal(x[1:], y[:-1])


def test_last_chunk_is_padded_and_masked(full_dm):
    text = full_dm.text
    for name, ds in splits(full_dm).items():
        a, b = full_dm.spans[name]
        valid = (b - a) % 129 - 1  # targets in the short last chunk
        x, y, _, mask = ds[len(ds) - 1]
        assert 0 < valid < 128 and int(mask.sum()) == valid and bool(mask[:valid].all())
        assert torch.all(x[valid:] == 0) and torch.all(y[valid:] == -100)
        assert full_dm.tokenizer.decode(y[:valid]) == text[b - valid : b]  # ends exactly at the span end
        # every character of the span except the chunks' first ones is a target exactly once
        assert int(ds.mask.sum()) == (b - a) - len(ds)


def test_tokenizer_covers_every_split_and_round_trips(full_dm):
    tok = full_dm.tokenizer
    for ds in splits(full_dm).values():
        assert int(ds.inputs.min()) >= 0 and int(ds.inputs.max()) < tok.vocab_size
        assert not bool((ds.targets[ds.mask] == tok.unk_id).any())  # no <unk>: the vocab saw all splits
    sample = full_dm.text[1000:3000]
    assert tok.decode(tok.encode(sample)) == sample
    assert tok.decode(tok.encode("a\U0001f600b")) == "a" + tok.unk_char + "b"  # no emoji in the docs
    restored = CharTokenizer.from_state_dict(tok.state_dict())
    assert restored == tok and torch.equal(restored.encode(sample), tok.encode(sample))
    assert all(isinstance(v, str) for v in tok.state_dict().values())  # plain python types


def test_tokenizer_unknown_characters_and_determinism():
    a, b = CharTokenizer("banana split"), CharTokenizer("split banana")
    assert a == b and a.chars == sorted(set("banana split")) and a.vocab_size == len(set("banana split")) + 1
    ids = a.encode("bandit\U0001f600")
    assert ids.dtype == torch.long and ids.tolist()[3] == a.unk_id == ids.tolist()[-1]  # 'd', emoji unknown
    assert a.decode(ids) == "ban" + a.unk_char + "it" + a.unk_char
    assert a.encode("").shape == (0,) and a.decode([]) == ""
    with pytest.raises(ValueError, match=r"id 99 is outside the vocabulary \(valid ids: 0 \.\. 9\)"):
        a.decode([1, 99])
    with pytest.raises(ValueError, match=r"id -100 is outside the vocabulary"):
        a.decode(torch.tensor([-100]))
    with pytest.raises(ValueError, match=r"`text` is empty"):
        CharTokenizer("")
    with pytest.raises(TypeError, match=r"`text` must be a str, got bytes"):
        CharTokenizer(b"abc")


def test_user_text_file(tmp_path):
    text = "".join(f"line {i}: the cat sat on the mat\n" for i in range(40))  # 1,270 characters
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    dm = TextDataModule(path=str(path), seq_len=16, batch_size=4, val_fraction=0.1, test_fraction=0.1, shuffle_seed=0)
    assert dm.vocab_size == len(set(text)) + 1  # available before setup (reads the file only)
    dm.setup()
    assert dm.text == text and dm.spans == {"train": (0, 1016), "val": (1016, 1143), "test": (1143, 1270)}
    sizes = (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset))
    assert sizes == (60, 8, 8)  # chunks of 17 characters, the last ones short
    x, y, index, mask = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == mask.shape == (4, 16) and index.shape == (4,)
    assert torch.equal(dm.train_dataset.inputs[index], x) and torch.equal(dm.train_dataset.targets[index], y)
    assert next(iter(dm.val_dataloader()))[2].tolist() == [0, 1, 2, 3]  # val / test in order


def test_max_chars_keeps_the_full_vocabulary():
    small = TextDataModule(seq_len=32, max_chars=5_000)
    small.setup()
    assert len(small.text) == 5_000 and small.text == default_corpus()[:5_000]
    assert small.vocab_size == len(set(default_corpus())) + 1 > len(set(small.text)) + 1
    assert small.spans == {"train": (0, 4_500), "val": (4_500, 4_750), "test": (4_750, 5_000)}


def test_tiny_corpus_gives_one_short_chunk_per_split(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("abcdefghijklmnopqrst", encoding="utf-8")  # 20 chars: 16 / 2 / 2
    dm = TextDataModule(path=str(path), seq_len=128, val_fraction=0.1, test_fraction=0.1, shuffle_seed=0)
    dm.setup()
    assert [len(ds) for ds in splits(dm).values()] == [1, 1, 1]
    x, y, _, mask = dm.val_dataset[0]
    assert dm.tokenizer.decode(x[:1]) == "q" and dm.tokenizer.decode(y[:1]) == "r" and int(mask.sum()) == 1
    assert dm.example_input().shape == (1, 128)


def test_chunk_dataset_drops_only_a_lone_last_id():
    assert len(TokenChunkDataset(torch.arange(9), seq_len=3)) == 2  # 4 + 4 + a lone id: nothing to predict
    assert len(TokenChunkDataset(torch.arange(10), seq_len=3)) == 3  # 4 + 4 + 2
    assert len(TokenChunkDataset(torch.arange(8), seq_len=3)) == 2


def test_training_order_is_resumable():
    def batches(seed, epoch):
        dm = TextDataModule(seq_len=16, batch_size=8, max_chars=3_000, shuffle_seed=seed)
        dm.setup()
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return [b[2].tolist() for b in loader]

    first = batches(3, 1)
    assert first == batches(3, 1)  # same seed, same epoch -> same batches (what a resumed run sees)
    assert first != batches(3, 0) and first != batches(4, 1)
    assert sorted(i for b in first for i in b) == list(range(sum(len(b) for b in first)))


def test_shuffle_seed_defaults_to_the_global_seed():
    torch.manual_seed(11)
    dm = TextDataModule(seq_len=16, max_chars=2_000)
    assert dm.num_classes > 2 and dm.shuffle_seed is None  # reading the vocab does not fix the seed
    dm.setup()
    assert dm.shuffle_seed == 11


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"seq_len": 0}, ValueError, r"`seq_len` must be an integer >= 1, got 0"),
        ({"batch_size": 2.0}, ValueError, r"`batch_size` must be an integer >= 1, got 2.0"),
        ({"val_fraction": 1.2}, ValueError, r"`val_fraction` must be in \(0, 1\), got 1.2"),
        ({"test_fraction": 0}, ValueError, r"`test_fraction` must be in \(0, 1\), got 0"),
        ({"val_fraction": 0.5, "test_fraction": 0.45}, ValueError, "must leave at least 10% for training"),
        ({"max_chars": 0}, ValueError, r"`max_chars` must be an integer >= 1, got 0"),
        ({"shuffle_seed": "1"}, TypeError, r"`shuffle_seed` must be an int or None, got '1'"),
        ({"num_workers": -1}, ValueError, r"`num_workers` must be an integer >= 0, got -1"),
        ({"path": 3}, TypeError, r"`path` must be a file path \(str\) or None, got int: 3"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        TextDataModule(**kwargs)


def test_file_errors(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=r"`path` '.*nope\.txt' does not exist.*path=None"):
        TextDataModule(path=str(missing))
    with pytest.raises(ValueError, match=r"is a directory"):
        TextDataModule(path=str(tmp_path))
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match=r"the corpus is empty: `path` '.*empty\.txt' has no characters"):
        TextDataModule(path=str(empty)).setup()
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    with pytest.raises(ValueError, match=r"is not UTF-8 text.*Convert it to UTF-8"):
        TextDataModule(path=str(latin)).setup()


def test_fractions_that_leave_a_split_without_a_chunk():
    dm = TextDataModule(max_chars=100, val_fraction=0.01, test_fraction=0.05)
    with pytest.raises(ValueError, match=r"the val split gets 1 character\(s\) of the 100.*Raise val_fraction"):
        dm.setup()
    dm = TextDataModule(max_chars=100, test_fraction=0.001)
    with pytest.raises(
        ValueError, match=r"the test split gets 0 character\(s\).*Raise test_fraction, raise or drop max_chars"
    ):
        _ = dm.num_classes
