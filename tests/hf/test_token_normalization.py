"""``loss_normalization="tokens"``: the same gradients however the tokens of a step are split.

Eight causal-LM sequences of lengths 6..12 (padded to 12) make one optimizer step, as one batch of 8, as 4
accumulated micro-batches of 2, and as 2 DDP processes of 4. Under "tokens" every term is a sum over its tokens
divided by the step's labelled-token count, so the three updates agree; under "batch" (each micro-batch's mean)
they do not -- which is what the test would see if the normalisation were lost.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "token_norm_step.py"
sys.path.insert(0, str(SCRIPT.parent))

from token_norm_step import update  # noqa: E402


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _scale(a: dict) -> float:
    return max(float(v.abs().max()) for v in a.values())


@pytest.mark.parametrize("kind", ["classifier", "kd"])
def test_accumulation_gives_the_gradient_of_the_whole_batch(kind, tmp_path):
    whole = update(kind, "tokens", 8, 1, 1, str(tmp_path))
    split = update(kind, "tokens", 2, 4, 1, str(tmp_path))
    assert whole["steps"] == split["steps"] == 1
    assert _max_diff(whole["delta"], split["delta"]) < 1e-5 * _scale(whole["delta"])
    # per-micro-batch means weigh the short sequences differently: a visible difference
    mean_whole = update(kind, "batch", 8, 1, 1, str(tmp_path))
    mean_split = update(kind, "batch", 2, 4, 1, str(tmp_path))
    assert _max_diff(mean_whole["delta"], mean_split["delta"]) > 1e-3 * _scale(mean_whole["delta"])
    # a single batch: "tokens" and "batch" agree for the cross-entropy-only classifier
    if kind == "classifier":
        assert _max_diff(whole["delta"], mean_whole["delta"]) < 1e-5 * _scale(whole["delta"])


def test_two_ddp_processes_give_the_gradient_of_the_whole_batch(tmp_path):
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "kd", "tokens", "4", "1", "2", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ddp = torch.load(out, weights_only=False)
    whole = update("kd", "tokens", 8, 1, 1, str(tmp_path))
    assert ddp["steps"] == 1
    assert _max_diff(whole["delta"], ddp["delta"]) < 1e-5 * _scale(whole["delta"])
