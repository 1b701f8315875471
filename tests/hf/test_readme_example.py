"""The README's Hugging Face example, run as written except for the training length, and its saved directory
checked: ``AutoModelForCausalLM`` / ``AutoTokenizer`` load it back and the reloaded model gives the trained
student's logits."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

README = Path(__file__).resolve().parents[2] / "README.md"
TEACHER_CHECKPOINT = "runs/hf/teacher/version_0/checkpoints/last.ckpt"
FULL_TRAINING = "max_epochs=15"
TWO_STEPS = ("max_steps=2, limit_val_batches=1, num_sanity_val_steps=0, logger=False, enable_checkpointing=False, "
             "enable_progress_bar=False, enable_model_summary=False")


def _example() -> str:
    text = README.read_text()
    section = text[text.index("## Hugging Face transformers"):]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "the README's Hugging Face section has no python block"
    return blocks[0]


def test_readme_hf_example_runs_and_saves_a_loadable_student(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    code = _example()
    assert code.count(FULL_TRAINING) == 1 and code.count(TEACHER_CHECKPOINT) == 1, "the README example changed"
    monkeypatch.chdir(tmp_path)
    # the teacher checkpoint the example expects from configs/hf/teacher.yaml: here an untrained teacher's weights
    # (with the architecture the example builds) in a Classifier checkpoint's layout
    shared = dict(vocab_size=512, n_positions=64, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=128, n_head=4, **shared))
    path = tmp_path / TEACHER_CHECKPOINT
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {f"model.{k}": v for k, v in teacher.state_dict().items()}}, path)

    namespace: dict = {}
    exec(compile(code.replace(FULL_TRAINING, TWO_STEPS), str(README), "exec"), namespace)  # noqa: S102
    module, dm, trainer = namespace["module"], namespace["dm"], namespace["trainer"]
    assert trainer.global_step == 2
    for name, value in teacher.state_dict().items():  # the teacher came from the checkpoint, untouched
        assert torch.equal(module.teacher.state_dict()[name], value), name

    directory = tmp_path / "student_hf"
    assert (directory / "config.json").is_file() and (directory / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert type(reloaded).__name__ == "GPT2LMHeadModel" and reloaded.config.n_layer == 2
    assert len(tokenizer) == len(dm.tokenizer) == 512
    ids = torch.tensor([tokenizer("def main(): return 0")["input_ids"]])
    assert ids.numel() > 1
    student = module.student.eval()
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, student(input_ids=ids).logits)
