"""``lightning_distill.cache``: the teacher-output cache (memory / disk, top-k, keys, safety checks).

Tolerances used below (and stated in the module docstring):

* ``dtype="float32"``: the cache holds exactly what the teacher returned -- bit-identical to the
  teacher run on the same batches; against the teacher on differently composed batches within
  float32 rounding (rtol 1e-6), and the KD loss (T=4) within rtol 1e-6;
* ``"float16"``: every value within relative 2**-11 (round to nearest) plus 1e-7 absolute for
  subnormals; KD loss within rtol 2e-3. ``"bfloat16"``: relative 2**-8; KD loss within rtol 2e-2;
* top-k: probabilities of the k stored classes and the tail's total mass exact to 1e-6 at T=1.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_distill.cache import (
    TeacherCache,
    check_deterministic,
    dataset_fingerprint,
    dense_to_topk,
    teacher_fingerprint,
    topk_to_dense,
)
from lightning_distill.data.common import EpochShuffleSampler, TensorClassificationDataset
from lightning_distill.losses import kd_loss

pytestmark = pytest.mark.usefixtures("single_thread")


def _data(n: int = 10, d: int = 4, seed: int = 0) -> TensorClassificationDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorClassificationDataset(torch.randn(n, d, generator=g), torch.randint(0, 3, (n,), generator=g))


def _teacher(d: int = 4, c: int = 5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(d, c).eval()


class _Counting:
    """``teacher_fn`` that counts its calls (and may fail on a given call)."""

    def __init__(self, fn, fail_on: int | None = None) -> None:
        self.fn, self.calls, self.fail_on = fn, 0, fail_on

    def __call__(self, x):
        self.calls += 1
        if self.fail_on is not None and self.calls == self.fail_on:
            raise RuntimeError("simulated crash in the teacher")
        return self.fn(x)


def _cache(storage: str, tmp_path, **kwargs) -> TeacherCache:
    directory = str(tmp_path / "cache") if storage == "disk" else None
    return TeacherCache(storage=storage, directory=directory, progress=False, **kwargs)


def _entries(tmp_path) -> list[str]:
    root = tmp_path / "cache"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# --------------------------------------------------------------------------------------------
# dense storage: same values as the teacher
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_float32_cache_equals_teacher(storage, tmp_path):
    data, teacher = _data(10), _teacher()
    cache = _cache(storage, tmp_path, batch_size=4)
    cache.build(teacher, data)
    with torch.no_grad():
        same_batches = torch.cat([teacher(data.inputs[i : i + 4]) for i in range(0, 10, 4)])
        one_batch = teacher(data.inputs)
    assert cache.is_built and len(cache) == 10 and cache.fields == ["logits"]
    assert cache.nbytes == 10 * 5 * 4
    got = cache.lookup(torch.arange(10))
    assert got.dtype == torch.float32 and torch.equal(got, same_batches)  # exact
    torch.testing.assert_close(got, one_batch, rtol=1e-6, atol=1e-7)
    perm = torch.tensor([7, 0, 9, 3, 3])
    assert torch.equal(cache.lookup(perm), same_batches[perm])
    assert cache.lookup(torch.tensor([], dtype=torch.long)).shape == (0, 5)
    if storage == "disk":
        assert cache.path == tmp_path / "cache" / cache.key and len(cache.key) == 64
        meta = json.loads((cache.path / "meta.json").read_text())
        assert meta["n"] == 10 and meta["key"] == cache.key and meta["fields"]["logits"]["shape"] == [5]
        assert np.load(cache.path / "00.data.npy").shape == (10, 5)
    else:
        assert cache.path is None


@pytest.mark.parametrize("storage", ["memory", "disk"])
@pytest.mark.parametrize("dtype, rel, loss_rtol", [("float16", 2.0**-11, 2e-3), ("bfloat16", 2.0**-8, 2e-2)])
def test_reduced_precision_within_rounding(storage, dtype, rel, loss_rtol, tmp_path):
    data, teacher = _data(12), _teacher()
    with torch.no_grad():
        teacher.weight.mul_(8.0)  # logits of a few units, like a trained teacher
        ref = teacher(data.inputs)
    cache = _cache(storage, tmp_path, dtype=dtype)
    cache.build(teacher, data)
    got = cache.lookup(torch.arange(12))
    assert got.dtype == torch.float32
    assert bool(((got - ref).abs() <= rel * ref.abs() + 1e-7).all())
    assert not torch.equal(got, ref)  # really rounded
    assert cache.nbytes == 12 * 5 * 2
    student = torch.randn(12, 5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(kd_loss(student, got, 4.0), kd_loss(student, ref, 4.0), rtol=loss_rtol, atol=0)
    if storage == "disk" and dtype == "bfloat16":
        meta = json.loads((cache.path / "meta.json").read_text())
        assert meta["fields"]["logits"]["stored_as"] == "int16"  # bit-exact bfloat16 view
        mem = _cache("memory", tmp_path, dtype="bfloat16")
        mem.build(teacher, data)
        assert torch.equal(mem.lookup(torch.arange(12)), got)


def test_kd_loss_with_cache_equals_live_teacher(tmp_path):
    """One shuffled epoch: KD (T=4) on cached logits vs the live teacher on the same batches."""
    data, teacher = _data(24, d=6), _teacher(d=6, c=7)
    torch.manual_seed(3)
    student = nn.Linear(6, 7)
    cache = _cache("disk", tmp_path, batch_size=5)
    cache.build(teacher, data)
    loader = DataLoader(data, batch_size=8, sampler=EpochShuffleSampler(data, seed=1))
    for x, _, index in loader:
        with torch.no_grad():
            live = teacher(x)
        s = student(x)
        cached = cache.lookup(index)
        torch.testing.assert_close(cached, live, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(kd_loss(s, cached, 4.0), kd_loss(s, live, 4.0), rtol=1e-6, atol=1e-9)


def test_digits_cnn_teacher_with_batchnorm(tmp_path):
    """A real teacher (BatchNorm buffers, eval mode) on the digits training split."""
    from lightning_distill.data import DigitsDataModule
    from lightning_distill.models import DigitsCNN

    dm = DigitsDataModule(batch_size=64, shuffle_seed=0)
    dm.setup("fit")
    torch.manual_seed(0)
    teacher = DigitsCNN().eval()
    cache = _cache("disk", tmp_path, batch_size=512)
    cache.build(teacher, dm.train_dataset)
    assert len(cache) == len(dm.train_dataset)
    x, _, index = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        torch.testing.assert_close(cache.lookup(index), teacher(x), rtol=1e-5, atol=1e-6)


class _DictSamples(Dataset):
    """Samples as dicts without an index (text-style); the cache keys them by position."""

    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": 0}


def test_dict_samples_without_index_and_explicit_device(tmp_path):
    data, teacher = _data(5), _teacher()
    seen = []

    def teacher_fn(x):
        seen.append(x.device)
        return teacher(x)

    cache = _cache("disk", tmp_path, batch_size=2)
    cache.build(teacher_fn, _DictSamples(data.inputs), device="cpu", teacher=teacher)
    assert seen == [torch.device("cpu")] * 3
    got = cache.lookup([4, 0], device=torch.device("cpu"))
    torch.testing.assert_close(got, teacher(data.inputs[[4, 0]]).detach(), rtol=1e-6, atol=1e-7)
    assert dataset_fingerprint(_DictSamples(data.inputs)) == dataset_fingerprint(_DictSamples(data.inputs.clone()))


# --------------------------------------------------------------------------------------------
# top-k storage
# --------------------------------------------------------------------------------------------


def test_topk_hand_checked_case():
    """C=4, k=2, z=[3, 1, 0, -1]: the tail {0, -1} becomes two entries log((e^0 + e^-1) / 2)."""
    z = torch.tensor([[3.0, 1.0, 0.0, -1.0]])
    values, indices, rest = dense_to_topk(z, 2)
    assert z.tolist() == [[3.0, 1.0, 0.0, -1.0]]  # the input is not modified
    assert values.tolist() == [[3.0, 1.0]] and indices.tolist() == [[0, 1]]
    assert rest.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    z_hat = topk_to_dense(values, indices, rest, 4)
    fill = math.log((1 + math.exp(-1)) / 2)
    torch.testing.assert_close(z_hat, torch.tensor([[3.0, 1.0, fill, fill]]))
    # explicit probabilities and KL(p || p_hat) in float64
    Z = math.exp(3) + math.exp(1) + 1 + math.exp(-1)
    p = [math.exp(3) / Z, math.exp(1) / Z, 1 / Z, math.exp(-1) / Z]
    tail_each = (1 + math.exp(-1)) / 2 / Z
    p_hat = [p[0], p[1], tail_each, tail_each]
    got = z_hat.double().softmax(-1)[0].tolist()
    assert got == pytest.approx(p_hat, abs=1e-7)
    kl = p[2] * math.log(p[2] / tail_each) + p[3] * math.log(p[3] / tail_each)
    kl_torch = F.kl_div(z_hat.double().log_softmax(-1), z.double().log_softmax(-1), log_target=True, reduction="sum")
    assert kl_torch.item() == pytest.approx(kl, rel=1e-5)
    # (1/Z) [log(2 / (1 + e^-1)) + e^-1 log(2 e^-1 / (1 + e^-1))] = 0.15175 / 24.1717
    assert kl == pytest.approx(0.006278, abs=1e-6)


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_topk_probabilities_and_tail_mass_exact(storage, tmp_path):
    torch.manual_seed(0)
    data, teacher, k = _data(9, d=8), nn.Linear(8, 50).eval(), 5
    with torch.no_grad():
        teacher.weight.mul_(3.0)
        z = teacher(data.inputs)
    cache = _cache(storage, tmp_path, top_k=k, batch_size=4)
    cache.build(teacher, data)
    z_hat = cache.lookup(torch.arange(9))
    assert z_hat.shape == (9, 50)
    p, p_hat = z.softmax(-1), z_hat.softmax(-1)
    top = z.topk(k, -1).indices
    torch.testing.assert_close(p_hat.gather(-1, top), p.gather(-1, top), rtol=0, atol=1e-6)
    tail = torch.ones_like(p, dtype=torch.bool).scatter(-1, top, False)
    torch.testing.assert_close((p_hat * tail).sum(-1), (p * tail).sum(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(z_hat.gather(-1, top), z.gather(-1, top))  # the stored logits are exact
    values, ids, rest = cache.lookup_topk(torch.tensor([4, 1]))
    assert values.shape == ids.shape == (2, k) and rest.shape == (2,) and ids.dtype == torch.long
    assert cache.nbytes == 9 * (k * 4 + k * 4 + 4)  # float32 values, int32 ids, float32 lse_rest


def test_topk_error_small_on_peaked_teacher_and_bounded():
    """KL error = eps * (tail KL difference); at T=4 the L1 error is <= 2 * rebuilt tail mass."""
    g = torch.Generator().manual_seed(0)
    n, c, k = 16, 100, 5
    z = torch.randn(n, c, generator=g)
    z[torch.arange(n), torch.randint(0, c, (n,), generator=g)] += 10.0  # peaked teacher
    s = torch.randn(n, c, generator=g, requires_grad=True)
    z_hat = topk_to_dense(*dense_to_topk(z, k), c)  # float32, as the cache stores it
    zd, sd = z.double(), s.detach().double()
    zhd = topk_to_dense(*dense_to_topk(zd, k), c)  # float64 for the exact identity
    assert zhd.dtype == torch.float64 and torch.allclose(zhd.float(), z_hat)
    log_p, log_ph, log_q = zd.log_softmax(-1), zhd.log_softmax(-1), sd.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    kl_hat = (log_ph.exp() * (log_ph - log_q)).sum(-1)
    # exact decomposition: eps * [KL(r || q_tail) - KL(u || q_tail)]
    top = zd.topk(k, -1).indices
    tail = torch.ones_like(zd, dtype=torch.bool).scatter(-1, top, False)
    eps = (log_p.exp() * tail).sum(-1)
    for i in range(n):
        r = log_p[i][tail[i]].exp() / eps[i]
        q = log_q[i][tail[i]].exp()
        q = q / q.sum()
        u = torch.full_like(r, 1.0 / (c - k))
        expected = eps[i] * ((r * (r / q).log()).sum() - (u * (u / q).log()).sum())
        assert (kl[i] - kl_hat[i]).item() == pytest.approx(expected.item(), abs=1e-10)
    assert float(eps.max()) < 0.03  # tail mass below 3%: the KL moves by under 0.5% of its value
    assert float(((kl - kl_hat).abs() / kl).max()) < 0.005
    # at T=4: ||p^T - p_hat^T||_1 <= 2 * eps_hat_T, and the KD gradient moves by <= 2 T eps_hat_T / N (L1)
    T = 4.0
    pT, phT = (zd / T).softmax(-1), (zhd / T).softmax(-1)
    eps_hat_T = (phT * tail).sum(-1)
    assert bool(((pT * tail).sum(-1) <= eps_hat_T + 1e-12).all())  # the uniform tail over-weights (Jensen)
    assert bool(((pT - phT).abs().sum(-1) <= 2 * eps_hat_T + 1e-12).all())
    (g_true,) = torch.autograd.grad(kd_loss(s, z, T), s)
    (g_hat,) = torch.autograd.grad(kd_loss(s, z_hat, T), s)
    assert bool(((g_true - g_hat).abs().sum(-1) <= 2 * T * eps_hat_T.float() / n + 1e-6).all())


@pytest.mark.parametrize("top_k", [None, 3])
@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_sequence_logits(storage, top_k, tmp_path):
    """[N, L, V] per-sample logits; top-k is taken over the vocabulary (last) dimension."""
    torch.manual_seed(0)
    n, length, d, v = 6, 3, 4, 11
    data = TensorClassificationDataset(torch.randn(n, length, d), torch.zeros(n, length, dtype=torch.long))
    teacher = nn.Linear(d, v).eval()
    cache = _cache(storage, tmp_path, top_k=top_k, batch_size=4)
    cache.build(teacher, data)
    with torch.no_grad():
        z = teacher(data.inputs)
    got = cache.lookup(torch.tensor([5, 0, 2]))
    assert got.shape == (3, length, v)
    if top_k is None:
        torch.testing.assert_close(got, z[[5, 0, 2]], rtol=1e-6, atol=1e-7)
    else:
        p, ph = z[[5, 0, 2]].softmax(-1), got.softmax(-1)
        top = z[[5, 0, 2]].topk(top_k, -1).indices
        torch.testing.assert_close(ph.gather(-1, top), p.gather(-1, top), rtol=0, atol=1e-6)
        _, _, rest = cache.lookup_topk(torch.tensor([5]))
        assert rest.shape == (1, length)


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_dict_fields(storage, tmp_path):
    """Logits plus a captured feature map; top_k applies to "logits" only."""
    torch.manual_seed(0)
    data = _data(7, d=4)
    body, head = nn.Linear(4, 6).eval(), nn.Linear(6, 9).eval()
    teacher = nn.Sequential(body, head).eval()

    def teacher_fn(x):
        h = body(x)
        return {"logits": head(h), "feat:body": h.reshape(-1, 2, 3)}

    cache = _cache(storage, tmp_path, top_k=4)
    cache.build(teacher_fn, data, teacher=teacher, tag="feat:body")
    assert cache.fields == ["logits", "feat:body"]
    out = cache.lookup(torch.tensor([6, 1]))
    assert isinstance(out, dict) and set(out) == {"logits", "feat:body"}
    with torch.no_grad():
        h = body(data.inputs[[6, 1]])
        z = head(h)
    torch.testing.assert_close(out["feat:body"], h.reshape(-1, 2, 3), rtol=1e-6, atol=1e-7)  # dense, float32
    top = z.topk(4, -1).indices
    torch.testing.assert_close(out["logits"].gather(-1, top), z.gather(-1, top))
    other = _cache(storage, tmp_path / "other", top_k=4)
    other.build(teacher_fn, data, teacher=teacher, tag="feat:other")
    assert other.key != cache.key  # the tag enters the key


# --------------------------------------------------------------------------------------------
# disk reuse, keys, crash safety
# --------------------------------------------------------------------------------------------


def test_disk_cache_reused_without_running_teacher(tmp_path, caplog):
    data, teacher = _data(10), _teacher()
    first_fn = _Counting(teacher)
    first = _cache("disk", tmp_path, batch_size=4)
    first.build(first_fn, data, teacher=teacher)
    assert first_fn.calls == 3
    second_fn = _Counting(teacher)
    second = _cache("disk", tmp_path, batch_size=4)
    with caplog.at_level(logging.INFO, logger="lightning_distill.cache"):
        second.build(second_fn, data, teacher=teacher)
    assert second_fn.calls == 0
    reuse = [r for r in caplog.records if "reusing teacher cache at" in r.getMessage()]
    assert len(reuse) == 1 and str(second.path) in reuse[0].getMessage()
    assert second.key == first.key and second.nbytes == first.nbytes
    assert torch.equal(second.lookup(torch.arange(10)), first.lookup(torch.arange(10)))
    assert _entries(tmp_path) == [first.key]  # one complete directory, no temporary left


def test_changed_teacher_or_data_gives_new_key_and_rebuild(tmp_path):
    data, teacher = _data(10), _teacher()
    base = _cache("disk", tmp_path)
    base.build(teacher, data)
    with torch.no_grad():
        teacher.bias[0] += 1e-3
    fn = _Counting(teacher)
    changed_teacher = _cache("disk", tmp_path)
    changed_teacher.build(fn, data, teacher=teacher)
    assert fn.calls == 1 and changed_teacher.key != base.key
    assert not torch.equal(changed_teacher.lookup(torch.arange(10)), base.lookup(torch.arange(10)))
    changed = _data(10)
    changed.inputs[3, 0] += 1e-6
    fn = _Counting(teacher)
    changed_data = _cache("disk", tmp_path)
    changed_data.build(fn, changed, teacher=teacher)
    assert fn.calls == 1 and changed_data.key not in (base.key, changed_teacher.key)
    assert _entries(tmp_path) == sorted([base.key, changed_teacher.key, changed_data.key])
    # options that change what is stored change the key too
    assert _cache("disk", tmp_path, top_k=2).compute_key(teacher, changed) != changed_data.key
    assert _cache("disk", tmp_path, dtype="float16").compute_key(teacher, changed) != changed_data.key


def test_fingerprints():
    data = _data(6)
    assert dataset_fingerprint(data) == dataset_fingerprint(_data(6))
    relabelled = TensorClassificationDataset(data.inputs, data.targets + 1)
    assert dataset_fingerprint(relabelled) == dataset_fingerprint(data)  # targets do not count

    class Plain(Dataset):  # no `inputs` attribute: hashed sample by sample
        def __init__(self, x):
            self.x = x

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i], 0

    assert dataset_fingerprint(Plain(data.inputs)) == dataset_fingerprint(Plain(data.inputs.clone()))
    assert dataset_fingerprint(Plain(data.inputs)) != dataset_fingerprint(Plain(data.inputs[:5]))
    assert dataset_fingerprint(Plain(data.inputs)) != dataset_fingerprint(Plain(data.inputs.double()))
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).eval()
    before = teacher_fingerprint(net)
    net[1].num_batches_tracked += 1  # a buffer
    assert teacher_fingerprint(net) != before
    relu, gelu = nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.Sequential(nn.Linear(2, 2), nn.GELU())
    gelu.load_state_dict(relu.state_dict())
    assert teacher_fingerprint(relu) != teacher_fingerprint(gelu)  # same weights, other architecture


def test_crash_during_build_leaves_no_cache_and_next_build_succeeds(tmp_path):
    data, teacher = _data(10), _teacher()
    crashing = _Counting(teacher, fail_on=2)
    cache = _cache("disk", tmp_path, batch_size=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cache.build(crashing, data, teacher=teacher)
    assert crashing.calls == 2 and not cache.is_built and len(cache) == 0
    assert _entries(tmp_path) == []  # the temporary directory was removed
    key = cache.compute_key(teacher, data)
    # a process killed with SIGKILL leaves its temporary directory behind: it is never used
    leftover = tmp_path / "cache" / f".{key}.tmp-99999-deadbeef"
    leftover.mkdir()
    (leftover / "00.data.npy").write_bytes(b"half written")
    fn = _Counting(teacher)
    cache.build(fn, data, teacher=teacher)
    assert fn.calls == 3 and cache.key == key
    torch.testing.assert_close(cache.lookup(torch.arange(10)), teacher(data.inputs).detach(), rtol=1e-6, atol=1e-7)
    assert (tmp_path / "cache" / key / "meta.json").is_file()
    mem = _cache("memory", tmp_path)
    with pytest.raises(RuntimeError, match="simulated crash"):
        mem.build(_Counting(teacher, fail_on=1), data, teacher=teacher)
    assert not mem.is_built and mem.nbytes == 0


def test_corrupt_complete_directory_is_reported(tmp_path):
    data, teacher = _data(4), _teacher()
    cache = _cache("disk", tmp_path)
    cache.build(teacher, data)
    (cache.path / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="is unreadable .*delete that directory"):
        _cache("disk", tmp_path).build(teacher, data)


# --------------------------------------------------------------------------------------------
# random transforms
# --------------------------------------------------------------------------------------------


class RandomNoise:
    """A transform whose name says it is random (found without loading anything)."""

    def __call__(self, x):
        return x + 0.01 * torch.randn_like(x)


class _TransformDataset(Dataset):
    def __init__(self, inputs, transform):
        self.inputs, self.transform = inputs, transform

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, i):
        return self.transform(self.inputs[i]), 0, i


class _SneakyDataset(Dataset):
    """Random noise without any transform attribute: caught by loading samples twice."""

    def __init__(self, inputs):
        self.x = inputs

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + torch.rand(()), 0, i


def test_random_transforms_refused_and_accepted_with_opt_in(tmp_path):
    inputs, teacher = _data(8).inputs, _teacher()
    named = _TransformDataset(inputs, RandomNoise())
    with pytest.raises(ValueError, match=r"random transforms: RandomNoise.*stale.*allow_random_transforms=True"):
        _cache("memory", tmp_path).build(teacher, named)
    with pytest.raises(ValueError, match=r"loading sample 0 twice gave two different inputs.*teacher_cache=None"):
        check_deterministic(_SneakyDataset(inputs))
    check_deterministic(_TransformDataset(inputs, lambda x: 2 * x))  # deterministic transform: fine
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    for data in (named, _SneakyDataset(inputs)):
        cache = _cache("disk", tmp_path, allow_random_transforms=True)
        cache.build(teacher, data)
        assert cache.is_built and cache.lookup(torch.arange(8)).shape == (8, 5)
        again = _cache("disk", tmp_path, allow_random_transforms=True)
        fn = _Counting(teacher)
        again.build(fn, data, teacher=teacher)  # seeded fingerprint: the same key, reused
        assert fn.calls == 0 and again.key == cache.key
    assert torch.equal(torch.get_rng_state(), torch_state)  # the global random state is untouched
    assert np.array_equal(np.random.get_state()[1], np_state[1]) and random.getstate() == py_state


def test_torchvision_random_transform_found_in_compose():
    transforms = pytest.importorskip("torchvision.transforms")
    compose = transforms.Compose([transforms.Lambda(lambda x: x), transforms.RandomHorizontalFlip()])
    with pytest.raises(ValueError, match="random transforms: RandomHorizontalFlip"):
        check_deterministic(_TransformDataset(torch.zeros(4, 1, 2, 2), compose))


# --------------------------------------------------------------------------------------------
# state, pickling, config
# --------------------------------------------------------------------------------------------


def test_state_dict_holds_no_tensors_and_pickle_drops_data(tmp_path, caplog):
    data, teacher = _data(6), _teacher()
    cache = _cache("memory", tmp_path, top_k=2)
    cache.build(teacher, data)
    state = cache.state_dict()
    assert state["key"] == cache.key and state["n"] == 6 and state["top_k"] == 2
    assert not any(isinstance(v, (torch.Tensor, np.ndarray)) for v in state.values())
    clone = pickle.loads(pickle.dumps(cache))
    assert not clone.is_built and clone.top_k == 2
    resumed = _cache("memory", tmp_path, top_k=2)
    resumed.load_state_dict(state)
    with torch.no_grad():
        teacher.weight.add_(1.0)
    with caplog.at_level(logging.WARNING, logger="lightning_distill.cache"):
        resumed.build(teacher, data)
    assert any("differs from the one in the checkpoint" in r.getMessage() for r in caplog.records)
    cache.clear()
    assert not cache.is_built and len(cache) == 0


def test_constructible_from_config():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--cache", type=TeacherCache)
    cfg = parser.parse_args(
        ["--cache", '{"class_path": "lightning_distill.cache.TeacherCache", '
         '"init_args": {"storage": "disk", "directory": "c", "top_k": 8, "dtype": "bfloat16"}}']
    )
    cache = parser.instantiate_classes(cfg).cache
    assert isinstance(cache, TeacherCache)
    assert (cache.storage, cache.directory, cache.top_k, cache.dtype) == ("disk", "c", 8, "bfloat16")


# --------------------------------------------------------------------------------------------
# bad arguments: one error each
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(storage="ssd"), ValueError, r"`storage` must be one of \('memory', 'disk'\), got 'ssd'"),
        (dict(storage="disk"), ValueError, r"`directory` is required with storage='disk'"),
        (dict(directory="d"), ValueError, r"`directory`='d' is only used with storage='disk'"),
        (dict(storage="disk", directory=3), TypeError, r"`directory` must be a path .* int 3"),
        (dict(top_k=0), ValueError, r"`top_k` must be an integer >= 1 .* got 0"),
        (dict(top_k=True), ValueError, r"`top_k` must be an integer >= 1 .* got True"),
        (dict(dtype="int8"), ValueError, r"`dtype` must be one of \('float32', 'float16', 'bfloat16'\).*'int8'"),
        (dict(allow_random_transforms="yes"), TypeError, r"`allow_random_transforms` must be True or False, got 'yes'"),
        (dict(progress=1), TypeError, r"`progress` must be True or False, got 1"),
        (dict(batch_size=0), ValueError, r"`batch_size` must be an integer >= 1 .* got 0"),
        (dict(num_workers=-1), ValueError, r"`num_workers` must be an integer >= 0 .* got -1"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        TeacherCache(**kwargs)


def test_check_deterministic_bad_arguments():
    with pytest.raises(ValueError, match=r"`n_probe` must be an integer >= 1, got 0"):
        check_deterministic(_data(3), n_probe=0)
    with pytest.raises(ValueError, match=r"`repeats` must be an integer >= 2 .* got 1"):
        check_deterministic(_data(3), repeats=1)


def test_dense_to_topk_rejects_k_not_below_classes():
    with pytest.raises(ValueError, match=r"`top_k` must be an integer in \[1, C - 1\] = \[1, 3\] .* got 4"):
        dense_to_topk(torch.zeros(2, 4), 4)


class _Stream(IterableDataset):
    def __iter__(self):
        yield from range(3)


def test_build_errors(tmp_path):
    data, teacher = _data(6), _teacher()
    cache = _cache("memory", tmp_path)
    with pytest.raises(TypeError, match=r"`teacher_fn` must be callable"):
        cache.build("teacher", data)
    with pytest.raises(ValueError, match=r"`teacher` is required when `teacher_fn` is not an nn.Module"):
        cache.build(lambda x: teacher(x), data)
    with pytest.raises(TypeError, match=r"`teacher` must be a torch.nn.Module, got str"):
        cache.build(lambda x: teacher(x), data, teacher="net")
    with pytest.raises(ValueError, match=r"the teacher is in train mode .*teacher.eval\(\)"):
        cache.build(nn.Linear(4, 5), data)
    with pytest.raises(ValueError, match=r"`dataset` is empty"):
        cache.build(teacher, _data(0))
    with pytest.raises(TypeError, match=r"`dataset` must be a map-style dataset .*IterableDataset"):
        cache.build(teacher, _Stream())
    with pytest.raises(ValueError, match=r"`top_k`=5 must be smaller than the number of classes.*C=5"):
        _cache("memory", tmp_path, top_k=5).build(teacher, data)
    with pytest.raises(ValueError, match=r"`top_k`=2 applies to the 'logits' field, but .*\['out'\]"):
        _cache("memory", tmp_path, top_k=2).build(lambda x: {"out": teacher(x)}, data, teacher=teacher)
    with pytest.raises(TypeError, match=r"must return a tensor \(logits\) or a non-empty dict .*got tuple"):
        cache.build(lambda x: (teacher(x),), data, teacher=teacher)
    with pytest.raises(TypeError, match=r"field 'logits' must be a floating-point tensor, got a torch.int64"):
        cache.build(lambda x: teacher(x).argmax(-1), data, teacher=teacher)
    with pytest.raises(ValueError, match=r"field 'logits' contains NaN for samples 0..5"):
        cache.build(lambda x: teacher(x) * float("nan"), data, teacher=teacher)
    with pytest.raises(ValueError, match=r"beyond the float16 range .*dtype='bfloat16'"):
        _cache("memory", tmp_path, dtype="float16").build(lambda x: teacher(x) * 1e6, data, teacher=teacher)
    with pytest.raises(ValueError, match=r"per-sample shape \(5,\) at sample 4 but \(3,\) before: pad"):
        _cache("memory", tmp_path, batch_size=4).build(
            lambda x: teacher(x)[:, : 3 if len(x) == 4 else 5], data, teacher=teacher
        )
    shifted = TensorClassificationDataset(data.inputs, data.targets)
    shifted.__class__ = type("Shifted", (TensorClassificationDataset,), {
        "__getitem__": lambda self, i: (self.inputs[i], self.targets[i], i + 1)
    })
    with pytest.raises(ValueError, match=r"sample index does not match the sample's position"):
        cache.build(teacher, shifted)
    assert not cache.is_built


def test_lookup_errors(tmp_path):
    data, teacher = _data(6), _teacher()
    cache = _cache("memory", tmp_path)
    with pytest.raises(RuntimeError, match=r"not built yet: call build"):
        cache.lookup(torch.tensor([0]))
    cache.build(teacher, data)
    with pytest.raises(ValueError, match=r"`index` holds \[6, 9\] outside \[0, 5\].*another split or dataset"):
        cache.lookup(torch.tensor([0, 6, 9]))
    with pytest.raises(ValueError, match=r"`index` holds \[-1\] outside"):
        cache.lookup(torch.tensor([-1]))
    with pytest.raises(TypeError, match=r"`index` must be an integer tensor .*torch.float32"):
        cache.lookup(torch.tensor([0.0]))
    with pytest.raises(ValueError, match=r"`index` must be 1-D .*\(2, 1\)"):
        cache.lookup(torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match=r"lookup_topk\(\) needs a cache built with `top_k`"):
        cache.lookup_topk(torch.tensor([0]))
