"""Peak memory of a distillation fit vs the student trained alone: the teacher costs its weights and
one batch of its activations -- no gradients, no optimizer state.

Three fits of ``--steps`` steps on the same synthetic 32x32 data (batch ``--batch``), each in a
fresh subprocess (this script re-invoked with ``--child``) so peaks never mix:

* (a) ``Classifier(ResNet8x4)``: the student alone;
* (b) ``KnowledgeDistillation(ResNet8x4, ResNet32x4)``: float32 teacher;
* (c) the same with ``teacher_dtype="bfloat16"``.

What is measured, per child:

* CPU (``--device cpu``): resident set size from ``/proc/self/status``. ``base`` = VmRSS after the
  data, the student and the Trainer exist but *before the teacher is built*; the peak counter
  (VmHWM) is reset (``echo 5 > /proc/self/clear_refs``) just before ``fit`` and read after it;
  ``peak - base`` is reported, so the teacher's resident weights count. Caveat: RSS sees the
  allocator, not tensors -- freed memory that malloc keeps for reuse still counts, and memory
  reused from an earlier free does not -- so only *differences* between variants mean something,
  and each child runs with ``MALLOC_MMAP_THRESHOLD_=65536`` (large blocks go straight back to the
  OS when freed) to keep that noise small. Where ``clear_refs`` cannot be written the peak falls
  back to the whole process's VmHWM (``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is the same
  number) and includes building the models.
* CUDA (``--device cuda``): ``torch.cuda.memory_allocated()`` before ``fit`` (models still on the
  CPU), ``torch.cuda.reset_peak_memory_stats()``, then ``torch.cuda.max_memory_allocated()`` after;
  exact tensor bytes, no allocator caching (the caching allocator's reserve is not counted).

The prediction for (b) - (a) and (c) - (a), computed in each child after its fit: the teacher's
weight bytes (every parameter and buffer) plus "one batch of teacher activations", bounded above by
the sum of the output bytes of every leaf module of the teacher for one batch under ``no_grad``
(forward hooks on a ``teacher_forward`` call). It is an upper bound: under ``no_grad`` each
intermediate is freed as soon as the next layer has consumed it, so the true transient is a few
feature maps -- and if the student's own forward/backward peak is higher than the teacher's
transient, the difference is close to the weights alone. Each child also checks and prints that
no teacher parameter has a ``.grad``, requires grad, or appears in the optimizer or its state.

    python benchmarks/memory.py                      # CPU, batch 64, 10 steps
    python benchmarks/memory.py --device cuda --batch 256
    python benchmarks/memory.py --quick              # smoke test: batch 4, 2 steps
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import subprocess
import sys
import warnings
from functools import partial
from typing import Any, Optional

from _machine import describe  # benchmarks/_machine.py: this folder is on sys.path when run as a script

VARIANTS = {
    "a": "Classifier, student alone",
    "b": "KnowledgeDistillation, float32 teacher",
    "c": "KnowledgeDistillation, teacher_dtype=bfloat16",
}
_RESULT = "MEMORY_RESULT "
MiB = 1024**2


# ------------------------------------------------------------------------------------------ child
def _proc_status() -> dict[str, int]:
    """VmRSS / VmHWM of this process in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024  # kB
    return out


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _tensor_bytes(module: Any) -> int:
    return sum(t.nbytes for t in module.parameters()) + sum(t.nbytes for t in module.buffers())


def _activation_bytes(module: Any, teacher: Any, x: Any) -> tuple[int, int]:
    """(sum, max) of the output bytes of every leaf module of ``teacher`` for one ``teacher_forward(x)``."""
    import torch

    sizes: list[int] = []

    def hook(mod: Any, inputs: Any, output: Any) -> None:
        outs = output if isinstance(output, (tuple, list)) else (output,)
        sizes.append(sum(o.nbytes for o in outs if isinstance(o, torch.Tensor)))

    leaves = [m for m in teacher.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        module.teacher_forward(x)
    finally:
        for h in handles:
            h.remove()
    return sum(sizes), max(sizes, default=0)


def child(variant: str, args: argparse.Namespace) -> None:
    warnings.filterwarnings("ignore")
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from lightning_distill import Classifier, KnowledgeDistillation
    from lightning_distill.data.common import TensorClassificationDataset
    from lightning_distill.models import ResNet8x4, ResNet32x4

    for name in ("lightning.pytorch", "lightning.fabric"):  # after the import, which sets them to INFO
        logging.getLogger(name).setLevel(logging.WARNING)

    cuda = args.device == "cuda"
    g = torch.Generator().manual_seed(args.seed)
    n = args.batch * args.steps
    data = TensorClassificationDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 100, (n,), generator=g))
    loader = DataLoader(data, batch_size=args.batch, shuffle=False)
    torch.manual_seed(args.seed + 1)
    student = ResNet8x4(num_classes=100)
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=1, max_steps=args.steps, max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    optimizer = partial(torch.optim.SGD, lr=0.01, momentum=0.9)  # momentum: the student has optimizer state
    gc.collect()
    base = _proc_status()["VmRSS"]  # before the teacher exists

    teacher = None
    if variant == "a":
        module: L.LightningModule = Classifier(student, optimizer=optimizer, num_classes=100)
    else:
        torch.manual_seed(args.seed + 2)
        teacher = ResNet32x4(num_classes=100)
        module = KnowledgeDistillation(student, teacher, temperature=4.0, alpha=0.9, optimizer=optimizer,
                                       num_classes=100, teacher_dtype="bfloat16" if variant == "c" else None)
    # num_classes given and no example input: setup() runs no shape probe (KD has nothing to build from shapes),
    # so the measured peak holds only the training steps
    gc.collect()
    result: dict[str, Any] = {"variant": variant, "machine": describe(args.device)}
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        trainer.fit(module, train_dataloaders=loader)
        torch.cuda.synchronize()
        result.update(method="torch.cuda.max_memory_allocated", base=before, before_fit=before,
                      peak=torch.cuda.max_memory_allocated())
    else:
        before_fit = _proc_status()["VmRSS"]
        reset = _reset_peak_rss()
        trainer.fit(module, train_dataloaders=loader)
        status = _proc_status()
        result.update(
            method="VmHWM (reset by /proc/self/clear_refs before fit)" if reset else "VmHWM of the whole process",
            base=base, before_fit=before_fit, peak=max(status["VmHWM"], before_fit),
        )
    result["steps"] = int(trainer.global_step)
    if teacher is not None:
        ids = {id(p) for p in teacher.parameters()}
        opt = trainer.optimizers[0]
        result.update(
            teacher_weights=_tensor_bytes(teacher),
            teacher_dtype=str(next(teacher.parameters()).dtype).replace("torch.", ""),
            teacher_grads=sum(p.grad is not None for p in teacher.parameters()),
            teacher_requires_grad=sum(p.requires_grad for p in teacher.parameters()),
            teacher_in_optimizer=sum(id(p) in ids for group in opt.param_groups for p in group["params"]),
            teacher_optimizer_state=sum(id(p) in ids for p in opt.state),
            optimizer_state_entries=len(opt.state),
        )
        x = data.inputs[: args.batch].to(module.device)
        result["activations_sum"], result["activations_max"] = _activation_bytes(module, teacher, x)
    print(_RESULT + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------- parent
def _start_child(variant: str, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--device", args.device,
           "--batch", str(args.batch), "--steps", str(args.steps), "--seed", str(args.seed)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONWARNINGS="ignore")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _result(variant: str, proc: subprocess.Popen) -> dict[str, Any]:
    stdout, stderr = proc.communicate()
    line = next((ln for ln in stdout.splitlines() if ln.startswith(_RESULT)), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"child {variant} failed (exit {proc.returncode}):\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return json.loads(line[len(_RESULT):])


def _run_children(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """One fresh process per variant, one after the other."""
    return {v: _result(v, _start_child(v, args)) for v in VARIANTS}



def _mib(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 64; 4 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per fit (default 10; 2 with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke test: batch 4, 2 steps")
    parser.add_argument("--child", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batch = args.batch or (4 if args.quick else 64)
    args.steps = args.steps or (2 if args.quick else 10)
    if args.child:
        child(args.child, args)
        return
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("skipped: no CUDA device (run without --device cuda for the CPU measurement)")
            return

    res = _run_children(args)
    a = res["a"]
    inc = {v: r["peak"] - r["base"] for v, r in res.items()}
    print(f"Machine: {a['machine']}")
    print(f"ResNet32x4 -> ResNet8x4, synthetic 3x32x32 / 100 classes, batch {args.batch}, {args.steps} steps per fit, "
          f"one fresh process per fit; method: {a['method']}"
          + ("" if args.device == "cuda" else "; children run with MALLOC_MMAP_THRESHOLD_=65536"))
    print()
    print("| variant | resident before fit | peak during fit | minus (a) | teacher weights "
          "| weights + activations (upper bound) | minus (a) within [0, bound] |")
    print("|---|---:|---:|---:|---:|---:|---|")
    checks = []
    for v, r in res.items():
        if v == "a":
            print(f"| (a) {VARIANTS[v]} | {_mib(r['before_fit'] - r['base'])} | {_mib(inc[v])} | - | - | - | - |")
            continue
        diff = inc[v] - inc["a"]
        bound = r["teacher_weights"] + r["activations_sum"]
        ok = 0 <= diff <= bound
        print(f"| ({v}) {VARIANTS[v]} | {_mib(r['before_fit'] - r['base'])} | {_mib(inc[v])} | {_mib(diff)} "
              f"| {_mib(r['teacher_weights'])} ({r['teacher_dtype']}) | {_mib(bound)} | {'yes' if ok else 'NO'} |")
        checks.append(
            f"({v}) teacher: {r['teacher_grads']} params with .grad, {r['teacher_requires_grad']} requiring grad, "
            f"{r['teacher_in_optimizer']} in the optimizer, {r['teacher_optimizer_state']} with optimizer state "
            f"(optimizer state entries: {r['optimizer_state_entries']}, all the student's); one batch of teacher "
            f"activations: sum of leaf outputs {_mib(r['activations_sum'])} (upper bound), largest one "
            f"{_mib(r['activations_max'])}; minus (a) - weights = {_mib(diff - r['teacher_weights'])}"
        )
    print()
    print("Both memory columns are relative to base: the process before the teacher is built (CUDA: memory "
          "allocated before fit, the models still on the CPU).")
    for line in checks:
        print(line)


if __name__ == "__main__":
    main()
