"""Cost of denormal floats on the CPU: a character-LM student step with and without ``torch.set_flush_denormal``.

Token-level KD over a vocabulary produces many tiny probabilities and gradients; on x86 CPUs arithmetic on
denormal numbers (below ~1e-38 in float32) can be far slower than on normal ones. This times the same
student step -- forward, loss, backward, Adam -- with the cross-entropy loss (the baseline) and with the
KD loss against fixed teacher logits, each with denormals flushed to zero or kept, alternating, and prints
the medians. The CLI's ``--flush_denormal true`` (set in ``configs/text/*.yaml``) is the switch measured.

    python benchmarks/flush_denormal.py            # teacher logits from configs/text/teacher.yaml's run if present
    python benchmarks/flush_denormal.py --steps 10 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from lightning_distill.checkpoint import load_weights
from lightning_distill.data import TextDataModule
from lightning_distill.losses import kd_loss
from lightning_distill.models import CharTransformer

TEACHER = "zoo:pydoc_char_transformer"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="alternating repeats of each variant")
    parser.add_argument("--teacher", default=TEACHER, help="teacher checkpoint (random teacher if missing)")
    args = parser.parse_args()
    torch.manual_seed(0)
    dm = TextDataModule(seq_len=128, batch_size=32, shuffle_seed=0)
    dm.setup("fit")
    x, y, _, mask = next(iter(dm.train_dataloader()))
    teacher = CharTransformer(dm.vocab_size, d_model=64, n_layers=2, n_heads=4, max_len=256).eval()
    trained = args.teacher.startswith("zoo:") or os.path.isfile(args.teacher)
    if trained:
        load_weights(teacher, args.teacher)
    with torch.no_grad():
        teacher_logits = teacher(x)
    student = CharTransformer(dm.vocab_size, d_model=32, n_layers=1, n_heads=2, max_len=256)
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)

    def run(kind: str, flush: bool) -> float:
        torch.set_flush_denormal(flush)
        start = time.perf_counter()
        for _ in range(args.steps):
            logits = student(x)
            if kind == "cross-entropy":
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
            else:
                loss = 0.5 * F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
                loss = loss + 0.5 * kd_loss(logits, teacher_logits, 2.0, mask=mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return (time.perf_counter() - start) / args.steps

    variants = [(k, f) for k in ("cross-entropy", "KD (T=2, alpha=0.5)") for f in (False, True)]
    for variant in variants:  # warm-up
        run(*variant)
    times: dict = {v: [] for v in variants}
    for _ in range(args.repeats):
        for variant in variants:
            times[variant].append(run(*variant))
    torch.set_flush_denormal(False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; student CharTransformer d32/L1, "
          f"batch 32 x 128 tokens, vocab {dm.vocab_size}; teacher {'trained' if trained else 'random'}")
    print("| loss | denormals kept | flushed to zero | speed-up |\n|---|---|---|---|")
    for kind in ("cross-entropy", "KD (T=2, alpha=0.5)"):
        kept, flushed = statistics.median(times[(kind, False)]), statistics.median(times[(kind, True)])
        print(f"| {kind} | {1e3 * kept:.1f} ms/step | {1e3 * flushed:.1f} ms/step | {kept / flushed:.2f}x |")


if __name__ == "__main__":
    main()
