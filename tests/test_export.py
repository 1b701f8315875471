"""``lightning-distill export`` (:mod:`lightning_distill.export`): the student alone, as safetensors, ONNX, a
``torch.export`` program or a Hugging Face directory, with outputs equal to PyTorch's at other batch sizes and
sequence lengths than the traced ones, and nothing written on bad input."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _state import IsolatedState
from torch import nn

from lightning_distill import Classifier, KnowledgeDistillation
from lightning_distill.batch import unpack_batch
from lightning_distill.cli import DistillCLI
from lightning_distill.data import CIFARDataModule, DigitsDataModule, TextDataModule
from lightning_distill.export import FORMATS, ExportCheckError, export_student, load_student
from lightning_distill.export import main as export_main
from lightning_distill.models import CharTransformer, DigitsCNN, DigitsMLP, DigitsStudentCNN, ResNet8x4, ResNet20
from lightning_distill.quantization import fake_quantize, quantized_layers
from lightning_distill.strategies.quant_aware import QuantAwareDistillation

pytestmark = pytest.mark.usefixtures("single_thread", "restore_global_state")

REPO = Path(__file__).resolve().parents[1]
FILE_FORMATS = ("safetensors", "onnx", "torch_export")  # every student; hf only for transformers students


# ------------------------------------------------------------------------------------------------ helpers
def _env() -> dict[str, str]:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])  # this checkout's package
    return env


def _run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lightning_distill", "export", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )


def _skip_without(fmt: str) -> None:
    """Skip a test of ``fmt`` when its optional packages are not installed."""
    needs = {"onnx": ("onnx", "onnxruntime", "onnxscript"), "safetensors": ("safetensors",),
             "hf": ("transformers", "safetensors"), "torch_export": ()}[fmt]  # fmt: skip
    for package in needs:
        pytest.importorskip(package)


def _logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def _reference(student: nn.Module, inputs: tuple, keywords: tuple = ()) -> torch.Tensor:
    """The PyTorch student's eval logits (the module's own network, fake-quantised if it is)."""
    modes = {m: m.training for m in student.modules()}
    student.eval()
    try:
        with torch.no_grad():
            out = student(**dict(zip(keywords, inputs)), use_cache=False) if keywords else student(*inputs)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return _logits(out).float()


def _reload(fmt: str, path: Path, architecture=None, keywords: tuple = ()):
    """The exported model as its own runtime loads it: a callable ``(*inputs) -> logits``."""
    if fmt == "onnx":
        ort = pytest.importorskip("onnxruntime")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return lambda *xs: torch.from_numpy(session.run(None, {n: x.numpy() for n, x in zip(names, xs)})[0])
    if fmt == "torch_export":
        program = torch.export.load(str(path)).module()
        return lambda *xs: program(*xs)
    if fmt == "safetensors":
        model = load_student(path, architecture()).eval()
    else:  # hf
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path).eval()
    return lambda *xs: _reference(model, xs, keywords)


def _stored_arrays(fmt: str, path: Path) -> list[np.ndarray]:
    """Every floating-point tensor the exported file holds."""
    if fmt == "onnx":
        onnx = pytest.importorskip("onnx")
        from onnx import numpy_helper

        arrays = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer]
    elif fmt == "torch_export":
        program = torch.export.load(str(path))
        tensors = list(program.state_dict.values()) + list(program.constants.values())
        arrays = [t.detach().numpy() for t in tensors if isinstance(t, torch.Tensor)]
    else:
        from safetensors.torch import load_file

        file = path / "model.safetensors" if fmt == "hf" else path
        arrays = [t.numpy() for t in load_file(str(file)).values()]
    return [a for a in arrays if np.issubdtype(a.dtype, np.floating)]


def _assert_student_alone(fmt: str, path: Path, student: nn.Module, teacher: nn.Module) -> None:
    """No teacher tensor is in the file (compared by value, in any layout), and the file holds no more numbers
    than the student has."""
    stored = _stored_arrays(fmt, path)
    by_size: dict[int, list[np.ndarray]] = {}
    for a in stored:
        by_size.setdefault(a.size, []).append(np.sort(a.ravel()))
    for name, t in teacher.state_dict().items():
        t = t.detach().float().numpy().ravel()
        if t.size < 8 or np.unique(t).size == 1:  # constant tensors (fresh BatchNorm) say nothing
            continue
        assert not any(np.array_equal(a, np.sort(t).astype(a.dtype)) for a in by_size.get(t.size, [])), name
    student_numbers = sum(t.numel() for t in student.state_dict().values() if t.is_floating_point())
    stored_numbers = sum(a.size for a in stored)
    assert stored_numbers <= student_numbers + 64, (stored_numbers, student_numbers)


def _check_printed(result, fmt: str, path: Path, n: int) -> None:
    text = str(result)
    runtime = {
        "onnx": "onnxruntime",
        "torch_export": r"torch\.export\.load\(\.\.\.\)\.module\(\)",
        "safetensors": "reloaded into a fresh \\w+",
        "hf": r"AutoModelForCausalLM\.from_pretrained",
    }[fmt]
    pattern = rf"^exported (student|model) \(\w+, [\d.]+k? params.*\) -> {re.escape(str(path))}; {runtime} vs PyTorch "
    assert re.match(pattern + rf"on {n} \w+ samples.*: max \|diff\| [\d.e+-]+$", text.splitlines()[0]), text
    assert result.max_diff < 1e-4, text


# ------------------------------------------------------------------------------------------------ data
@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule(batch_size=64)
    dm.setup("test")
    return unpack_batch(next(iter(dm.test_dataloader()))).input


def _write_fake_cifar10(root: Path) -> None:
    """A small CIFAR-10 folder in torchvision's on-disk format (random images): 5 x 8 train, 24 test."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def dump(name: str, n: int) -> None:
        data = {"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), "labels": [i % 10 for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(data, f)

    for b in range(1, 6):
        dump(f"data_batch_{b}", 8)
    dump("test_batch", 24)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    _write_fake_cifar10(root)
    dm = CIFARDataModule(
        root=str(root),
        num_classes=10,
        batch_size=24,
        num_workers=0,
        download=False,
        val_size=10,
        verify_checksums=False,
    )
    dm.setup("test")
    return unpack_batch(next(iter(dm.test_dataloader()))).input


@pytest.fixture(scope="module")
def text():
    dm = TextDataModule(seq_len=24, batch_size=16, max_chars=20_000, shuffle_seed=0)
    dm.setup("test")
    return dm, unpack_batch(next(iter(dm.test_dataloader()))).input


@pytest.fixture(scope="module")
def tokens():
    pytest.importorskip("transformers")
    from lightning_distill.data import TokenizedTextDataModule

    dm = TokenizedTextDataModule(
        vocab_size=200,
        max_chars=30_000,
        val_fraction=0.2,
        test_fraction=0.2,
        seq_len=24,
        packing=False,
        batch_size=16,
        shuffle_seed=0,
    )
    dm.setup("test")
    batch = unpack_batch(next(iter(dm.test_dataloader())))
    # right padding of different lengths, as in a batch of short documents (the test text is one long one)
    ids, mask = batch.inputs["input_ids"].clone(), batch.inputs["attention_mask"].clone()
    for i in range(len(ids)):
        mask[i, ids.shape[1] - i % 6 :] = 0
    ids[mask == 0] = dm.tokenizer.pad_token_id
    return dm, batch._replace(input=ids, inputs={"input_ids": ids, "attention_mask": mask})


# ------------------------------------------------------------------------------------------------ round trips
def _image_case(name: str, request) -> tuple:
    """(module, teacher, architecture factory, real batch) of an image student."""
    torch.manual_seed(0)
    if name == "resnet20":  # the smallest CIFAR ResNet of lightning_distill.models.cifar (0.27M parameters)
        teacher = ResNet8x4(num_classes=10)
        module = KnowledgeDistillation(ResNet20(num_classes=10), teacher)
        return module, teacher, lambda: ResNet20(num_classes=10), request.getfixturevalue("cifar")
    make = {"mlp": lambda: DigitsMLP(hidden=16), "cnn": lambda: DigitsCNN(width=8)}[name]
    teacher = DigitsCNN()
    module = KnowledgeDistillation(make(), teacher, teacher_checkpoint="zoo:digits_cnn")
    return module, teacher, make, request.getfixturevalue("digits")


@pytest.mark.parametrize("fmt", FILE_FORMATS)
@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet20"])
def test_image_students_round_trip(name, fmt, tmp_path, request):
    module, teacher, make, x = _image_case(name, request)
    _skip_without(fmt)
    student = module.student
    if name == "cnn":  # trained BatchNorm statistics, not the fresh ones
        with torch.no_grad():
            for m in student.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / f"student{FORMATS[fmt]}"
    result = export_student(module, fmt, path, x, where="test")
    _check_printed(result, fmt, path, len(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left behind
    run = _reload(fmt, path, make)
    for n in (5, len(x)):  # traced on 2 samples; 5 and the whole batch are new sizes
        batch = x[:n]
        torch.testing.assert_close(run(batch), _reference(student, (batch,)), atol=1e-4, rtol=1e-4)
    _assert_student_alone(fmt, path, student, teacher)
    assert student.training is True  # the module is left as it was


@pytest.mark.parametrize("fmt", FILE_FORMATS)
def test_char_transformer_round_trips_with_dynamic_batch_and_sequence(fmt, tmp_path, text):
    dm, ids = text
    _skip_without(fmt)
    torch.manual_seed(0)

    def make():
        return CharTransformer(vocab_size=dm.vocab_size, d_model=16, n_layers=1, n_heads=2, max_len=32)

    teacher = CharTransformer(vocab_size=dm.vocab_size, d_model=32, n_layers=2, n_heads=2, max_len=32)
    module = KnowledgeDistillation(make(), teacher)
    path = tmp_path / f"char{FORMATS[fmt]}"
    result = export_student(module, fmt, path, ids, where="test")
    _check_printed(result, fmt, path, len(ids))
    assert "of 24 tokens" in str(result)
    if fmt != "safetensors":
        assert "inputs: input_ids int64 [batch, sequence] -> logits float32 [batch, sequence, " in str(result)
    run = _reload(fmt, path, make)
    for n, length in ((1, 5), (3, 24), (16, 32), (7, 2)):  # traced on 2 x 12
        batch = ids[:n, :length] if length <= ids.shape[1] else torch.cat([ids[:n], ids[:n, : length - 24]], dim=1)
        torch.testing.assert_close(run(batch), _reference(module.student, (batch,)), atol=1e-4, rtol=1e-4)
    _assert_student_alone(fmt, path, module.student, teacher)


@pytest.mark.parametrize("fmt", [*FILE_FORMATS, "hf"])
def test_hf_causal_lm_round_trips_as_logits_with_dynamic_batch_and_sequence(fmt, tmp_path, tokens):
    from _hf import tiny_gpt2

    dm, batch = tokens
    _skip_without(fmt)
    student = tiny_gpt2(n_layer=1, n_embd=16, vocab_size=dm.vocab_size, dropout=0.0, seed=0)
    teacher = tiny_gpt2(n_layer=2, n_embd=32, vocab_size=dm.vocab_size, dropout=0.0, seed=1)
    module = KnowledgeDistillation(student, teacher)
    path = tmp_path / ("student_hf" if fmt == "hf" else f"gpt2{FORMATS[fmt]}")
    result = export_student(module, fmt, path, batch, where="test", tokenizer=dm.tokenizer)
    _check_printed(result, fmt, path, len(batch.input))
    if fmt in ("onnx", "torch_export"):
        assert re.search(
            r"inputs: input_ids int64 \[batch, sequence\], attention_mask int64 \[batch, sequence\] -> "
            rf"logits float32 \[batch, sequence, {dm.vocab_size}\]",
            str(result),
        ), str(result)
    keys = ("input_ids", "attention_mask")
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    assert bool((mask == 0).any()), "the check batch should hold padding"

    def make():
        return tiny_gpt2(n_layer=1, n_embd=16, vocab_size=dm.vocab_size, dropout=0.0, seed=5)

    run = _reload(fmt, path, make, keys)
    length = ids.shape[1]
    for n, cut in ((1, 3), (5, length), (len(ids), length - 1)):
        inputs = (ids[:n, :cut].contiguous(), mask[:n, :cut].contiguous())
        torch.testing.assert_close(run(*inputs), _reference(student, inputs, keys), atol=1e-4, rtol=1e-4)
    _assert_student_alone(fmt, path, student, teacher)
    if fmt == "hf":
        from transformers import AutoTokenizer

        assert (path / "config.json").is_file() and AutoTokenizer.from_pretrained(path).get_vocab() == (
            dm.tokenizer.get_vocab()
        )
        # exporting again replaces the earlier directory as a whole (nothing of the old one, no temporary left)
        (path / "stale.txt").write_text("from the earlier export")
        export_student(module, fmt, path, batch, where="test")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["student_hf"] and not (path / "stale.txt").exists()
        assert (path / "model.safetensors").is_file()


@pytest.mark.parametrize("fmt", FILE_FORMATS)
def test_quantised_student_exports_its_quantised_weights_and_input_quantisers(fmt, tmp_path, digits):
    """A 4-bit per-channel asymmetric MLP student with 8-bit inputs (the ternary MLP of the shipped config goes
    through the command below): the exported model computes what the fake-quantised student computes."""
    from lightning_distill.quantization.modules import activation_quantizer_bits

    _skip_without(fmt)
    torch.manual_seed(0)
    module = QuantAwareDistillation(
        DigitsMLP(hidden=16),
        DigitsCNN(),
        teacher_checkpoint="zoo:digits_cnn",
        bits=4,
        per_channel=True,
        symmetric=False,
        activation_bits=8,
    )
    student = module.student
    path = tmp_path / f"q{FORMATS[fmt]}"
    result = export_student(module, fmt, path, digits, where="test")
    assert result.max_diff <= 1e-5 and "params, 4-bit weights, 8-bit inputs)" in str(result), str(result)
    run = _reload(fmt, path, lambda: DigitsMLP(hidden=16))
    for n in (5, len(digits)):  # the fake-quantised student's eval outputs, at other batch sizes than traced
        torch.testing.assert_close(run(digits[:n]), _reference(student, (digits[:n],)), atol=1e-5, rtol=1e-5)
    _assert_student_alone(fmt, path, student, module.teacher)
    if fmt == "safetensors":  # dequantised weights, Q(W) in float, under the plain architecture's keys
        stored = _assert_dequantised(path, student)
        assert all(row.unique().numel() <= 16 for row in stored["block1.1.weight"])  # 4 bits per output channel
        reloaded = load_student(path, DigitsMLP(hidden=16))  # re-attaches the 8-bit input quantisers
        assert {activation_quantizer_bits(reloaded.block1[1]), activation_quantizer_bits(reloaded.head)} == {8}


def _assert_dequantised(path: Path, student: nn.Module) -> dict[str, torch.Tensor]:
    """The safetensors export holds each quantised layer's Q(W): equal to what the student's forward uses, on the
    grid (quantising it again changes nothing), the layers named in the metadata."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    stored = load_file(str(path))
    layers = quantized_layers(student)
    assert layers
    for name, layer in layers.items():
        q = stored[f"{name}.weight"]
        torch.testing.assert_close(q, layer.weight.detach(), atol=0, rtol=0)
        options = {k: v for k, v in layer.parametrizations.weight[0].options().items() if k != "ch_axis"}
        assert torch.equal(fake_quantize(q, **options), q)
    with safe_open(str(path), framework="pt") as f:
        assert sorted(json.loads(f.metadata()["lightning_distill.quantized_layers"])) == sorted(layers)
    return stored


# ------------------------------------------------------------------------------------------------ the command
QUICK = [
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
    "--trainer.max_epochs",
    "1",
    "--trainer.limit_train_batches",
    "2",
    "--trainer.limit_val_batches",
    "1",
    "--test_after_fit",
    "false",
]


def _fit(cwd: Path, config: Path, *args: str) -> Path:
    """A 2-step fit of ``config`` in ``cwd``; returns its run directory (config.yaml, checkpoints/)."""
    with IsolatedState(cwd), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        DistillCLI(args=["fit", "--config", str(config), *QUICK, *args])
    (run,) = [p.parent for p in cwd.rglob("config.yaml") if (p.parent / "checkpoints").is_dir()]
    return run


@pytest.fixture(scope="module")
def quant_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("quant_run")
    return _fit(cwd, REPO / "configs" / "digits" / "quant_ternary_kd.yaml")


@pytest.mark.parametrize("fmt", FILE_FORMATS)
def test_command_exports_a_fitted_quantised_student(fmt, quant_run, tmp_path):
    """End to end: a 2-step fit of the ternary-student config, then ``python -m lightning_distill export``."""
    _skip_without(fmt)
    ckpt = quant_run / "checkpoints" / "last.ckpt"
    out = tmp_path / f"student{FORMATS[fmt]}"
    # the run's own saved config.yaml for onnx, the shipped config file for the others
    config = quant_run / "config.yaml" if fmt == "onnx" else REPO / "configs" / "digits" / "quant_ternary_kd.yaml"
    proc = _run_cli(tmp_path, "--config", str(config), "--ckpt_path", str(ckpt), "--format", fmt, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[0]
    match = re.match(
        rf"^exported student \(DigitsMLP, 1\.2k params, ternary weights\) -> {re.escape(str(out))}; "
        r".+ vs PyTorch on 64 test samples: max \|diff\| ([\d.e+-]+)$",
        line,
    )
    assert match and float(match.group(1)) < 1e-5, proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]

    # the file holds the checkpoint's student: compare with that student rebuilt here
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    module = QuantAwareDistillation(
        DigitsMLP(hidden=16), DigitsCNN(), ternary=True, teacher_checkpoint="zoo:digits_cnn"
    )
    module.student.load_state_dict({k[len("student.") :]: v for k, v in state.items() if k.startswith("student.")})
    assert not any(k.startswith("teacher.") for k in state)
    dm = DigitsDataModule(batch_size=100)
    dm.setup("test")
    x = unpack_batch(next(iter(dm.test_dataloader()))).input
    run = _reload(fmt, out, lambda: DigitsMLP(hidden=16))
    torch.testing.assert_close(run(x), _reference(module.student, (x,)), atol=1e-5, rtol=1e-5)
    _assert_student_alone(fmt, out, module.student, module.teacher)  # the config's teacher
    if fmt == "safetensors":  # ternary: {-a, 0, a} per layer; a plain DigitsMLP loads the file as it is
        stored = _assert_dequantised(out, module.student)
        assert all(stored[f"{name}.weight"].unique().numel() <= 3 for name in ("block1.1", "head"))
        plain = DigitsMLP(hidden=16)
        plain.load_state_dict(stored)
        torch.testing.assert_close(_reference(plain, (x,)), _reference(module.student, (x,)), atol=0, rtol=0)


HF_CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {save_dir: runs, name: gpt2_kd}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {save_last: true}
model:
  class_path: lightning_distill.KnowledgeDistillation
  init_args:
    student:
      class_path: transformers.GPT2LMHeadModel
      init_args:
        config:
          class_path: transformers.GPT2Config
          init_args: {vocab_size: 200, n_positions: 32, n_embd: 16, n_layer: 1, n_head: 2, resid_pdrop: 0.0,
                      embd_pdrop: 0.0, attn_pdrop: 0.0, bos_token_id: 2, eos_token_id: 3, pad_token_id: 0}
    teacher:
      class_path: transformers.GPT2LMHeadModel
      init_args:
        config:
          class_path: transformers.GPT2Config
          init_args: {vocab_size: 200, n_positions: 32, n_embd: 32, n_layer: 2, n_head: 2, resid_pdrop: 0.0,
                      embd_pdrop: 0.0, attn_pdrop: 0.0, bos_token_id: 2, eos_token_id: 3, pad_token_id: 0}
    teacher_checkpoint: teacher_run/missing.ckpt   # never read by export (nor here: see the fit below)
    label_shift: next_token
data:
  class_path: lightning_distill.data.TokenizedTextDataModule
  init_args: {vocab_size: 200, max_chars: 30000, val_fraction: 0.2, test_fraction: 0.2, seq_len: 24,
              packing: false, batch_size: 8, shuffle_seed: 0}
"""


def test_command_writes_a_hugging_face_directory(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = tmp_path / "gpt2_kd.yaml"
    config.write_text(HF_CONFIG)
    run = _fit(tmp_path, config, "--model.init_args.teacher_checkpoint", "null")
    out = tmp_path / "student_hf"
    # the shipped config names a teacher checkpoint that does not exist: export never reads it
    proc = _run_cli(
        tmp_path,
        "--config",
        str(config),
        "--ckpt_path",
        str(run / "checkpoints" / "last.ckpt"),
        "--format",
        "hf",
        "--out",
        str(out),
        "--samples",
        "6",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.match(
        rf"^exported student \(GPT2LMHeadModel, [\d.]+k params\) -> {re.escape(str(out))}; "
        r"AutoModelForCausalLM\.from_pretrained vs PyTorch on 6 test samples of \d+ tokens: max \|diff\| "
        r"[\d.e+-]+$",
        proc.stdout.strip(),
    ), proc.stdout
    model = AutoModelForCausalLM.from_pretrained(out)
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[f"student.{key}"], atol=0, rtol=0)
    assert not any(k.startswith("teacher.") for k in state)
    assert len(AutoTokenizer.from_pretrained(out)) == 200


# ------------------------------------------------------------------------------------------------ bad input
def _fails(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as info:
        export_main(list(args))
    assert info.value.code == 2
    return capsys.readouterr().err


def test_bad_input_is_rejected_before_anything_is_written(capsys, tmp_path, quant_run):
    _skip_without("safetensors")
    config = str(quant_run / "config.yaml")
    ckpt = str(quant_run / "checkpoints" / "last.ckpt")
    before = sorted(quant_run.rglob("*"))

    err = _fails(capsys, "--config", config, "--ckpt_path", ckpt, "--format", "tflite")
    assert "unknown export format 'tflite'; valid formats: safetensors, onnx, torch_export, hf." in err
    err = _fails(capsys, "--config", config, "--ckpt_path", str(tmp_path / "nope.ckpt"), "--format", "onnx")
    assert "nope.ckpt" in err and "no such file" in err
    (tmp_path / "a_dir").mkdir()
    err = _fails(capsys, "--config", config, "--ckpt_path", ckpt, "--format", "onnx", "--out", str(tmp_path / "a_dir"))
    assert "is a directory, but the onnx format writes one file" in err
    err = _fails(capsys, "--config", config, "--ckpt_path", ckpt, "--format", "onnx", "--out", str(tmp_path / "s.pt2"))
    assert "suffix of the 'torch_export' format" in err
    # a checkpoint of another student: every key that does not fit is named
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {f"student.{k}": v for k, v in DigitsStudentCNN().state_dict().items()}}, other)
    err = _fails(
        capsys,
        "--config",
        config,
        "--ckpt_path",
        str(other),
        "--format",
        "safetensors",
        "--out",
        str(tmp_path / "s.safetensors"),
    )
    assert "does not match the architecture of DigitsMLP" in err
    assert "block1.1.parametrizations.weight.original" in err and "block1.0.0.weight" in err
    if importlib.util.find_spec("transformers") is not None:  # hf needs a transformers student
        err = _fails(capsys, "--config", config, "--ckpt_path", ckpt, "--format", "hf", "--out", str(tmp_path / "hf"))
        assert "the hf format writes Hugging Face model directories, but the student is a " in err
        assert "lightning_distill.models.digits.DigitsMLP" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir", "other.ckpt"]
    assert sorted(quant_run.rglob("*")) == before


def test_missing_optional_package_names_the_extra(capsys, tmp_path, quant_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    err = _fails(
        capsys,
        "--config",
        str(quant_run / "config.yaml"),
        "--ckpt_path",
        str(quant_run / "checkpoints" / "last.ckpt"),
        "--format",
        "onnx",
        "--out",
        str(tmp_path / "s.onnx"),
    )
    assert "optional package `onnxruntime`" in err and '".[export]"' in err
    assert list(tmp_path.iterdir()) == []


def test_a_failed_check_leaves_no_file_and_an_old_export_in_place(tmp_path, digits, monkeypatch):
    _skip_without("safetensors")
    import lightning_distill.export as export_module

    module = KnowledgeDistillation(DigitsMLP(hidden=16), DigitsCNN())
    path = tmp_path / "student.safetensors"
    path.write_bytes(b"the previous export")
    real_load = export_module.load_student

    def load_off_by_one(*args, **kwargs):  # the file reloads into a model whose outputs differ
        model = real_load(*args, **kwargs)
        with torch.no_grad():
            model.head.bias.add_(1.0)
        return model

    monkeypatch.setattr(export_module, "load_student", load_off_by_one)
    with pytest.raises(ExportCheckError, match="differ from PyTorch's by up to 1 "):
        export_student(module, "safetensors", path, digits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.safetensors"]
    assert path.read_bytes() == b"the previous export"
    with pytest.raises(ValueError, match="valid formats: safetensors, onnx, torch_export, hf"):
        export_student(module, "pickle", tmp_path / "x.pkl", digits)


def test_a_student_with_nan_weights_is_refused_before_anything_is_written(tmp_path, digits):
    _skip_without("safetensors")
    module = KnowledgeDistillation(DigitsMLP(hidden=16), DigitsCNN())
    with torch.no_grad():
        module.student.head.bias[0] = float("nan")
    path = tmp_path / "student.safetensors"
    path.write_bytes(b"the previous export")
    with pytest.raises(ValueError, match=r"holds NaN / Inf in 1 tensor\(s\) \(head.bias\).*nothing was exported"):
        export_student(module, "safetensors", path, digits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.safetensors"]
    assert path.read_bytes() == b"the previous export"


def test_without_data_the_check_runs_on_the_checkpoints_probe_spec(capsys, tmp_path, quant_run):
    """A datamodule that yields nothing (CIFAR files absent): the check falls back to zeros of the input spec that
    the checkpoint's shape probe saved."""
    _skip_without("safetensors")
    config = yaml.safe_load((quant_run / "config.yaml").read_text())
    config["data"] = {
        "class_path": "lightning_distill.data.CIFARDataModule",
        "init_args": {"root": str(tmp_path / "no_cifar_here"), "download": False, "num_workers": 0},
    }
    (tmp_path / "no_data.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "student.safetensors"
    ckpt = quant_run / "checkpoints" / "last.ckpt"
    export_main(["--config", str(tmp_path / "no_data.yaml"), "--ckpt_path", str(ckpt), "--format", "safetensors",
                 "--out", str(out)])  # fmt: skip
    captured = capsys.readouterr()
    assert "the datamodule gave no batch to check on (test: " in captured.err
    assert "vs PyTorch on 2 all-zero samples of the checkpoint's input spec: max |diff| 0" in captured.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_data.yaml", "student.safetensors"]


def test_traceable_scale_snap_is_bit_identical():
    """The arithmetic form of the quantisers' scale truncation traced into ONNX graphs equals the bit-mask form,
    across magnitudes and at powers of two and their neighbours."""
    from lightning_distill.export import _traceable_snap
    from lightning_distill.quantization.grid import _snap

    for dtype in (torch.float64, torch.float32):
        g = torch.Generator().manual_seed(0)
        x = torch.exp(torch.empty(20_000, dtype=torch.float64).uniform_(-60, 60, generator=g)).to(dtype)
        powers = torch.pow(torch.tensor(2.0, dtype=dtype), torch.arange(-100, 100, dtype=dtype))
        x = torch.cat([x, powers, torch.nextafter(powers, 0 * powers), torch.nextafter(powers, 2 * powers)])
        assert torch.equal(_traceable_snap(x), _snap(x)), dtype


# ------------------------------------------------------------------------------------------------ safetensors in
def test_safetensors_export_is_a_teacher_checkpoint_and_a_zoo_name(tmp_path, monkeypatch, digits):
    from lightning_distill import zoo

    _skip_without("safetensors")
    torch.manual_seed(0)
    trained = Classifier(DigitsCNN(width=8))
    path = tmp_path / "teacher_cnn.safetensors"
    export_student(trained, "safetensors", path, digits)
    for reference in (str(path), "zoo:teacher_cnn"):
        monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path)
        module = KnowledgeDistillation(DigitsMLP(), DigitsCNN(width=8), teacher_checkpoint=reference)
        for key, value in trained.model.state_dict().items():
            torch.testing.assert_close(module.teacher.state_dict()[key], value, atol=0, rtol=0)
    assert zoo.available() == ["teacher_cnn"]
    assert zoo.resolve("zoo:teacher_cnn") == path
