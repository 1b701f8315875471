"""Hugging Face export of a distilled student (``lightning_distill.hf.save_pretrained``) and Hugging Face weights as a
``teacher_checkpoint``."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

pytest.importorskip("transformers")

from _hf import tiny_bert_mlm, tiny_distilbert_mlm, tiny_gpt2  # noqa: E402

from lightning_distill import Classifier, KnowledgeDistillation  # noqa: E402
from lightning_distill.data import TokenizedTextDataModule  # noqa: E402
from lightning_distill.hf import save_pretrained  # noqa: E402

SMALL = dict(vocab_size=200, max_chars=30_000, val_fraction=0.2, test_fraction=0.2, shuffle_seed=0, seq_len=32,
             batch_size=8)


def _fit(module, dm, make_trainer):
    trainer = make_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    return module


def _logits(model, batch):
    model.eval()
    keys = ("input_ids", "attention_mask") + (("token_type_ids",) if "token_type_ids" in batch else ())
    with torch.no_grad():
        accepted = inspect.signature(model.forward).parameters
        return model(**{k: batch[k] for k in keys if k in accepted}).logits


def _check_directory(directory, student, teacher, dm, reloaded):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    files = sorted(p.name for p in directory.iterdir())
    assert [f for f in files if f.endswith((".safetensors", ".bin", ".pt", ".ckpt"))] == ["model.safetensors"]
    saved = load_file(directory / "model.safetensors")
    own, theirs = student.state_dict(), teacher.state_dict()
    assert set(saved) <= set(own) and all(torch.equal(saved[k], own[k]) for k in saved)
    assert sum(v.numel() for v in saved.values()) == sum(p.numel() for p in student.parameters())  # the student alone
    assert set(theirs) - set(own) and not (set(theirs) - set(own)) & set(saved)  # none of the teacher's own weights
    assert type(reloaded) is type(student)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    for doc in dm.documents["val"] + dm.documents["train"][:1]:
        assert tokenizer(doc)["input_ids"] == dm.tokenizer(doc)["input_ids"]
        assert tokenizer.decode(tokenizer(doc)["input_ids"]) == dm.tokenizer.decode(dm.tokenizer(doc)["input_ids"])
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.mask_token_id, len(tokenizer)) == (
        dm.tokenizer.pad_token_id, dm.tokenizer.eos_token_id, dm.tokenizer.mask_token_id, len(dm.tokenizer))


def test_causal_student_round_trips_through_auto_model_for_causal_lm(tmp_path, make_trainer):
    from transformers import AutoModelForCausalLM

    dm = TokenizedTextDataModule(**SMALL)
    ids = dict(vocab_size=dm.vocab_size, bos_token_id=dm.tokenizer.bos_token_id, eos_token_id=dm.tokenizer.eos_token_id)
    module = _fit(KnowledgeDistillation(tiny_gpt2(seed=1, **ids), tiny_gpt2(n_layer=2, n_embd=32, seed=2, **ids),
                                        temperature=2.0), dm, make_trainer)
    directory = save_pretrained(module, tmp_path / "student", tokenizer=dm.tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(directory)
    batch = dm.example_input(4)
    torch.testing.assert_close(_logits(reloaded, batch), _logits(module.student, batch), rtol=0, atol=0)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()  # still tied
    _check_directory(directory, module.student, module.teacher, dm, reloaded)


def test_masked_lm_student_round_trips_through_auto_model_for_masked_lm(tmp_path, make_trainer):
    from transformers import AutoModelForMaskedLM

    dm = TokenizedTextDataModule(**SMALL, objective="mlm", tokenizer_kind="wordpiece")
    ids = dict(vocab_size=dm.vocab_size, pad_token_id=dm.pad_token_id)
    module = _fit(KnowledgeDistillation(tiny_distilbert_mlm(seed=1, **ids), tiny_bert_mlm(n_layer=2, seed=2, **ids)),
                  dm, make_trainer)
    directory = save_pretrained(module, tmp_path / "student", tokenizer=dm.tokenizer.backend_tokenizer)
    reloaded = AutoModelForMaskedLM.from_pretrained(directory)
    batch = dm.example_input(4)
    torch.testing.assert_close(_logits(reloaded, batch), _logits(module.student, batch), rtol=0, atol=0)
    _check_directory(directory, module.student, module.teacher, dm, reloaded)


def test_a_classifier_exports_its_model_and_training_flags_are_not_exported(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_gpt2(seed=3, dropout=0.0)
    model.config.output_hidden_states = True  # what an objective reading hidden states switches on
    directory = save_pretrained(Classifier(model), tmp_path / "model")
    assert json.loads((directory / "config.json").read_text()).get("output_hidden_states", False) is False
    assert model.config.output_hidden_states is True  # the live model is left as it was
    reloaded = AutoModelForCausalLM.from_pretrained(directory)
    x = torch.randint(0, 40, (2, 8))
    assert torch.equal(reloaded(input_ids=x).logits, model.eval()(input_ids=x).logits)


def test_models_that_are_not_transformers_models_are_refused():
    with pytest.raises(TypeError, match=r"needs a transformers PreTrainedModel, but the trained model \(the student\) "
                                        r"is a torch\.nn\.modules\.linear\.Linear.*"
                                        r"torch\.save\(module\.student\.state_dict"):
        save_pretrained(Classifier(torch.nn.Linear(4, 3)), "unused")
    with pytest.raises(ValueError, match="is a file"):
        save_pretrained(tiny_gpt2(), __file__)


# ------------------------------------------------------------------------------------ Hugging Face teacher_checkpoint
def test_a_hugging_face_directory_or_safetensors_file_is_a_teacher_checkpoint(tmp_path):
    trained = tiny_gpt2(n_layer=2, seed=7)
    trained.save_pretrained(tmp_path / "teacher")
    for checkpoint in (tmp_path / "teacher", str(tmp_path / "teacher" / "model.safetensors")):
        module = KnowledgeDistillation(tiny_gpt2(seed=1), tiny_gpt2(n_layer=2, seed=8),
                                       teacher_checkpoint=str(checkpoint))
        loaded = module.teacher.state_dict()
        assert all(torch.equal(v, loaded[k]) for k, v in trained.state_dict().items())  # tied lm_head included
        assert module.teacher.lm_head.weight.data_ptr() == module.teacher.transformer.wte.weight.data_ptr()
    with pytest.raises(ValueError, match=r"does not match the architecture of GPT2LMHeadModel: unexpected keys.*h\.1"):
        KnowledgeDistillation(tiny_gpt2(seed=1), tiny_gpt2(n_layer=1), teacher_checkpoint=str(tmp_path / "teacher"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is a directory without model weights"):
        KnowledgeDistillation(tiny_gpt2(seed=1), tiny_gpt2(), teacher_checkpoint=str(tmp_path / "empty"))
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="broken.safetensors is not a readable safetensors file"):
        KnowledgeDistillation(tiny_gpt2(seed=1), tiny_gpt2(), teacher_checkpoint=str(tmp_path / "broken.safetensors"))


def test_pretrained_loads_a_saved_student_from_python_and_from_yaml(tmp_path):
    import yaml
    from jsonargparse import ArgumentParser

    from lightning_distill.hf import pretrained

    model = tiny_gpt2(n_layer=1, dropout=0.0)
    save_pretrained(model, tmp_path / "student")
    batch = {"input_ids": torch.randint(2, 40, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    expected = _logits(model, batch)
    assert torch.equal(_logits(pretrained(tmp_path / "student"), batch), expected)
    parser = ArgumentParser()
    parser.add_argument("--teacher", type=torch.nn.Module)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"teacher": {"class_path": "lightning_distill.hf.pretrained",
                                                  "init_args": {"path": str(tmp_path / "student"), "task": "causal_lm"}}}))
    teacher = parser.instantiate(parser.parse_path(str(config))).teacher
    assert type(teacher).__name__ == "GPT2LMHeadModel" and torch.equal(_logits(teacher, batch), expected)
    with pytest.raises(ValueError, match=r"`task` must be one of \('causal_lm', 'masked_lm'"):
        pretrained(tmp_path / "student", task="seq2seq")
