"""Model I/O of the composable core: outputs (``as_outputs``), batches (``unpack_batch``), input routing, and the
logit strategies end to end with students / teachers that return dicts or objects and take keyword inputs.

The stand-in models record every call (positional argument count, keyword names, train / eval flag), so the
tests check what each model actually received.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_distill import (
    CTKD,
    BornAgain,
    DistillationModule,
    KnowledgeDistillation,
    MultiTeacherDistillation,
    MutualLearning,
    QuantAwareDistillation,
)
from lightning_distill.batch import Batch, InputRouting, KeywordInputs, call_model, resolve_routing, unpack_batch
from lightning_distill.losses import kd_loss
from lightning_distill.objectives import CrossEntropy, LogitKD
from lightning_distill.outputs import ModelOutputs, as_outputs
from lightning_distill.teachers import FrozenTeacher

# ============================================================================================
# Stand-in models
# ============================================================================================

VOCAB, LENGTH, TOKEN_CLASSES = 24, 6, 4


def _record_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
    module.calls.append({"args": len(args), "kwargs": sorted(k for k, v in kwargs.items() if v is not None),
                         "training": module.training})


class Recording(nn.Module):
    """Records how it is called -- ``{"args": number of positional arguments, "kwargs": sorted names of the
    keyword arguments (not None), "training": train / eval flag}`` -- by a forward pre-hook, so every model keeps
    its plain ``forward`` signature (which is what input routing reads)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, Any]] = []
        self.register_forward_pre_hook(_record_call, with_kwargs=True)


@dataclass
class Output:
    """A dataclass output with ``logits`` (what many research codebases return)."""

    logits: Tensor
    hidden_states: Optional[tuple[Tensor, ...]] = None


class HFLikeOutput(OrderedDict):
    """A Hugging Face ``ModelOutput`` look-alike: an OrderedDict whose entries are also attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class PlainObject:
    """An object that only has a ``logits`` attribute."""

    def __init__(self, logits: Tensor) -> None:
        self.logits = logits


class ImageNet(Recording):
    """Flatten 8x8 digits -> hidden -> classes; ``returns`` is ``"dict"`` or ``"object"`` (a dataclass)."""

    def __init__(self, returns: str = "dict", hidden: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.returns = returns
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Any:
        h = self.body(x)
        logits = self.head(h)
        return {"logits": logits, "hidden_states": (h,)} if self.returns == "dict" else Output(logits, (h,))


class KeywordStudent(Recording):
    """A token classifier taking ``input_ids`` and ``attention_mask`` by name (no ``token_type_ids``)."""

    def __init__(self, returns: str = "dict", dim: int = 8) -> None:
        super().__init__()
        self.returns = returns
        self.emb = nn.Embedding(VOCAB, dim)
        self.head = nn.Linear(dim, TOKEN_CLASSES)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Any:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        m = mask.unsqueeze(-1).float()
        logits = self.head((self.emb(input_ids) * m).sum(1) / m.sum(1).clamp_min(1.0))
        return {"logits": logits} if self.returns == "dict" else Output(logits)


class BertLikeTeacher(Recording):
    """A BERT-style token classifier: ``input_ids``, ``attention_mask`` and ``token_type_ids`` by name."""

    def __init__(self, returns: str = "object", dim: int = 12) -> None:
        super().__init__()
        self.returns = returns
        self.emb = nn.Embedding(VOCAB, dim)
        self.types = nn.Embedding(2, dim)
        self.head = nn.Linear(dim, TOKEN_CLASSES)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None) -> Any:
        h = self.emb(input_ids)
        if token_type_ids is not None:
            h = h + self.types(token_type_ids)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        m = mask.unsqueeze(-1).float()
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        logits = self.head(pooled)
        return Output(logits, (pooled,)) if self.returns == "object" else {"logits": logits}


class PositionalTokenTeacher(Recording):
    """A token classifier with ``forward(self, ids)`` returning a dict (a teacher of the multi-teacher preset)."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim)
        self.head = nn.Linear(dim, TOKEN_CLASSES)

    def forward(self, ids: Tensor) -> dict[str, Tensor]:
        return {"logits": self.head(self.emb(ids).mean(1))}


class PositionalNet(Recording):
    """``forward(self, x)``: a plain positional model."""

    def __init__(self, in_features: int = 3, out_features: int = 4) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


class VarKeywordModel(Recording):
    def forward(self, **kwargs: Tensor) -> Tensor:
        return kwargs["input_ids"].float()


class TokenDataset(Dataset):
    """Dicts ``{input_ids, attention_mask, token_type_ids, labels}`` of random token ids (padding id 0)."""

    def __init__(self, n: int = 48, seed: int = 0, index: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(3, LENGTH + 1, (n,), generator=g)
        self.mask = (torch.arange(LENGTH) < lengths[:, None]).long()
        self.ids = torch.randint(1, VOCAB, (n, LENGTH), generator=g) * self.mask
        self.types = (torch.arange(LENGTH) >= 3).long().expand(n, LENGTH).clone()
        self.labels = self.ids[:, 0] % TOKEN_CLASSES
        self.index = index

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        item = {"input_ids": self.ids[i], "attention_mask": self.mask[i], "token_type_ids": self.types[i],
                "labels": self.labels[i]}
        if self.index:
            item["index"] = torch.tensor(i)
        return item


def token_batch(n: int = 4, seed: int = 1) -> dict[str, Tensor]:
    return next(iter(DataLoader(TokenDataset(n, seed), batch_size=n)))


def logits_of(output: Any) -> Tensor:
    """The logits of the stand-ins' outputs, read here without ``as_outputs``."""
    return output["logits"] if isinstance(output, dict) else output.logits


# ============================================================================================
# as_outputs and ModelOutputs
# ============================================================================================


def test_tensor_output_is_the_logits():
    z = torch.randn(2, 3)
    out = as_outputs(z)
    assert out.logits is z
    assert out.hidden_states is None and out.attentions is None and out.features == {} and out.extras == {}


def test_model_outputs_pass_through():
    out = ModelOutputs(torch.zeros(1, 2))
    assert as_outputs(out) is out


def test_dict_output_with_every_known_entry_and_extras():
    z, h, a, aux = torch.randn(2, 3), (torch.randn(2, 4),), (torch.randn(2, 1, 5, 5),), torch.tensor(1.0)
    out = as_outputs({"logits": z, "hidden_states": h, "attentions": a, "aux": aux, "loss": 3})
    assert out.logits is z and out.hidden_states is h and out.attentions is a
    assert out.extras == {"aux": aux, "loss": 3}


def test_dict_output_without_hidden_states():
    out = as_outputs({"logits": torch.zeros(1, 2)})
    assert out.hidden_states is None and out.attentions is None and out.extras == {}


@pytest.mark.parametrize("source, prefix", [(None, "the model"), ("the teacher", "the teacher")])
def test_dict_without_logits_is_a_clear_error(source, prefix):
    kwargs = {} if source is None else {"source": source}
    with pytest.raises(ValueError, match=re.escape(f"{prefix} returned a dict without a 'logits' entry (keys: ['hidden', 'scores']); distillation reads the logits")):
        as_outputs({"scores": torch.zeros(1, 2), "hidden": torch.zeros(1, 2)}, **kwargs)


def test_hugging_face_style_output():
    z, h = torch.randn(2, 5), (torch.randn(2, 3), torch.randn(2, 3))
    raw = HFLikeOutput(loss=torch.tensor(0.5), logits=z, hidden_states=h)
    assert raw.logits is z  # the look-alike behaves like a ModelOutput
    out = as_outputs(raw)
    assert out.logits is z and out.hidden_states is h and out.attentions is None
    assert list(out.extras) == ["loss"]
    with pytest.raises(ValueError, match=r"returned a HFLikeOutput without a 'logits' entry \(keys: \['loss'\]\)"):
        as_outputs(HFLikeOutput(loss=torch.tensor(0.5)))


def test_object_with_logits():
    z = torch.randn(3, 2)
    out = as_outputs(PlainObject(z))
    assert out.logits is z and out.hidden_states is None and out.attentions is None


def test_dataclass_with_hidden_states_and_attentions():
    @dataclass
    class Full:
        logits: Tensor
        hidden_states: tuple
        attentions: tuple

    z, h, a = torch.randn(2, 3), (torch.randn(2, 4),), (torch.randn(2, 2, 2),)
    out = as_outputs(Full(z, h, a))
    assert out.logits is z and out.hidden_states is h and out.attentions is a


def test_dataclass_keeps_its_other_fields_in_extras():
    @dataclass
    class WithLoss:
        logits: Tensor
        loss: Tensor

    loss = torch.tensor(0.3)
    assert as_outputs(WithLoss(torch.zeros(1, 2), loss)).extras == {"loss": loss}


@pytest.mark.parametrize("container", [tuple, list])
def test_tuple_output_first_element_is_the_logits(container):
    z, aux1, aux2 = torch.randn(2, 3), torch.randn(2, 4), "note"
    out = as_outputs(container([z, aux1, aux2]))
    assert out.logits is z
    assert out.extras["outputs"][0] is aux1 and out.extras["outputs"][1] == "note" and len(out.extras["outputs"]) == 2
    single = as_outputs(container([z]))
    assert single.logits is z and single.extras == {}


@pytest.mark.parametrize("raw", [(), ("logits", torch.zeros(1)), [None, torch.zeros(1)]])
def test_tuple_without_leading_tensor_is_a_clear_error(raw):
    with pytest.raises(ValueError, match=rf"the student returned a {type(raw).__name__} whose first element is not a tensor"):
        as_outputs(raw, "the student")


class WithLogitsField(NamedTuple):
    loss: Tensor
    logits: Tensor
    hidden_states: Optional[tuple] = None


class WithoutLogitsField(NamedTuple):
    scores: Tensor
    features: Tensor


def test_namedtuple_with_a_logits_field_is_read_by_name():
    loss, z, h = torch.tensor(1.0), torch.randn(2, 3), (torch.randn(2, 5),)
    out = as_outputs(WithLogitsField(loss, z, h))
    assert out.logits is z  # not the first element
    assert out.hidden_states is h
    assert out.extras == {"loss": loss}


def test_namedtuple_without_a_logits_field_is_read_as_a_tuple():
    z, f = torch.randn(2, 3), torch.randn(2, 7)
    out = as_outputs(WithoutLogitsField(z, f))
    assert out.logits is z
    assert len(out.extras["outputs"]) == 1 and out.extras["outputs"][0] is f


@pytest.mark.parametrize("raw, name", [(3, "int"), ("logits", "str"), (None, "NoneType"), ({1, 2}, "set"), (2.5, "float")])
def test_unsupported_output_is_a_type_error_naming_the_type(raw, name):
    with pytest.raises(TypeError, match=rf"^the teacher returned a {name}; distillation needs a logits tensor"):
        as_outputs(raw, "the teacher")


def test_detach_detaches_every_tensor_and_keeps_values():
    w = torch.randn(2, 3, requires_grad=True)
    out = ModelOutputs(w * 2, {"block1": w * 3}, (w * 4, w * 5), (w * 6,), {"note": "x"})
    d = out.detach()
    assert d is not out
    for got, ref in [(d.logits, out.logits), (d.features["block1"], out.features["block1"]),
                     (d.hidden_states[0], out.hidden_states[0]), (d.hidden_states[1], out.hidden_states[1]),
                     (d.attentions[0], out.attentions[0])]:
        assert not got.requires_grad and got.grad_fn is None
        assert torch.equal(got, ref)
    assert isinstance(d.hidden_states, tuple) and len(d.hidden_states) == 2
    assert d.extras == {"note": "x"} and d.extras is not out.extras
    assert out.logits.requires_grad  # the original is untouched
    empty = ModelOutputs().detach()
    assert empty.logits is None and empty.hidden_states is None and empty.features == {}


def test_detach_also_detaches_extras():
    w = torch.randn(2, 3, requires_grad=True)
    d = as_outputs((w * 2, w * 3)).detach()
    assert not d.extras["outputs"][0].requires_grad
    d = as_outputs({"logits": w * 2, "aux": w * 3}).detach()
    assert not d.extras["aux"].requires_grad


# ============================================================================================
# unpack_batch
# ============================================================================================


def test_tuples_and_lists_of_one_to_four():
    x, y, i, m = torch.randn(2, 3), torch.tensor([0, 1]), torch.tensor([5, 6]), torch.ones(2, 3, dtype=torch.bool)
    for container in (tuple, list):
        assert unpack_batch(container([x])) == Batch(x)
        b = unpack_batch(container([x, y]))
        assert b.input is x and b.target is y and b.index is None and b.mask is None and b.inputs is None
        b = unpack_batch(container([x, y, i]))
        assert b.input is x and b.target is y and b.index is i and b.mask is None
        b = unpack_batch(container([x, y, i, m]))
        assert (b.input, b.target, b.index, b.mask) == (x, y, i, m) and b.inputs is None and b.mixed is None


def test_tensor_and_batch():
    x = torch.randn(2, 3)
    b = unpack_batch(x)
    assert b.input is x and b.target is None and b.inputs is None
    assert unpack_batch(b) is b


@pytest.mark.parametrize("size", [0, 5, 6])
def test_tuple_of_wrong_length(size):
    with pytest.raises(ValueError, match=re.escape(f"a tuple batch must be (input[, target[, index[, mask]]]), got {size} elements.")):
        unpack_batch(tuple(torch.zeros(1) for _ in range(size)))


@pytest.mark.parametrize("raw, name", [(3, "int"), ("batch", "str"), (None, "NoneType"), (2.0, "float")])
def test_unsupported_batch_type(raw, name):
    with pytest.raises(TypeError, match=rf"^cannot read a batch of type {name}\.$"):
        unpack_batch(raw)


@pytest.mark.parametrize("input_key", ["input", "inputs", "x", "input_ids", "image", "images"])
@pytest.mark.parametrize("target_key", ["target", "targets", "y", "label", "labels"])
def test_dict_key_spellings(input_key, target_key):
    x, y, extra = torch.randn(2, 3), torch.tensor([1, 0]), torch.zeros(2)
    b = unpack_batch({input_key: x, target_key: y, "extra": extra})
    assert b.input is x and b.target is y and b.index is None and b.mask is None
    assert set(b.inputs) == {input_key, "extra"}  # the label is not an input
    assert b.inputs[input_key] is x and b.inputs["extra"] is extra


@pytest.mark.parametrize("mask_key", ["mask", "attention_mask"])
def test_dict_mask_and_index(mask_key):
    ids, mask, y, i = torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4), torch.zeros(2, 4), torch.tensor([3, 4])
    b = unpack_batch({"input_ids": ids, mask_key: mask, "labels": y, "index": i, "token_type_ids": ids * 0})
    assert b.input is ids and b.target is y and b.index is i and b.mask is mask
    assert set(b.inputs) == {"input_ids", mask_key, "token_type_ids"}  # no labels, no index; the mask stays


def test_dict_without_labels():
    x = torch.randn(2, 3)
    b = unpack_batch({"x": x})
    assert b.input is x and b.target is None and b.inputs == {"x": x}


def test_dict_input_key_precedence():
    a, b_, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    assert unpack_batch({"input_ids": a, "x": b_, "images": c}).input is b_  # order: input, inputs, x, input_ids, ...
    assert unpack_batch({"images": c, "input_ids": a}).input is a
    assert unpack_batch({"label": a, "labels": b_, "x": c}).target is a  # target, targets, y, label, labels


def test_dict_without_an_input_key():
    with pytest.raises(ValueError, match=re.escape("a dict batch needs one of the keys ('input', 'inputs', 'x', 'input_ids', 'image', 'images'), got keys ['labels', 'pixel_values'].")):
        unpack_batch({"pixel_values": torch.zeros(1), "labels": torch.zeros(1)})


def test_the_default_collate_of_token_dicts_unpacks():
    raw = token_batch(4)
    b = unpack_batch(raw)
    assert b.input is raw["input_ids"] and b.target is raw["labels"] and b.mask is raw["attention_mask"]
    assert set(b.inputs) == {"input_ids", "attention_mask", "token_type_ids"}


# ============================================================================================
# Input routing
# ============================================================================================


def test_auto_routes_dict_batches_by_keyword():
    model = KeywordStudent()
    raw = token_batch(3)
    out = call_model(model, unpack_batch(raw))
    assert model.calls[-1] == {"args": 0, "kwargs": ["attention_mask", "input_ids"], "training": True}
    with torch.no_grad():
        expected = logits_of(model(input_ids=raw["input_ids"], attention_mask=raw["attention_mask"]))
    assert torch.equal(logits_of(out), expected)


def test_auto_routes_tuple_batches_positionally():
    model = PositionalNet()
    x = torch.randn(2, 3)
    out = call_model(model, unpack_batch((x, torch.tensor([0, 1]))))
    assert model.calls[-1]["args"] == 1 and model.calls[-1]["kwargs"] == []
    assert torch.equal(out, model.linear(x))


def test_auto_falls_back_to_positional_when_no_name_matches():
    class XModel(Recording):
        def forward(self, x):  # takes `x` by name; the batch calls it `image`
            return x * 2

    model = XModel()
    x = torch.randn(2, 3)
    out = InputRouting("auto")(model, unpack_batch({"image": x, "label": torch.tensor([0, 1])}))
    assert torch.equal(out, x * 2)
    assert model.calls == [{"args": 1, "kwargs": [], "training": True}]


def test_auto_passes_a_matching_name_by_keyword():
    class XModel(Recording):
        def forward(self, x, scale=1.0):
            return x * scale

    model = XModel()
    x = torch.randn(2, 3)
    out = InputRouting("auto")(model, unpack_batch({"x": x, "scale": 3.0, "y": torch.zeros(2)}))
    assert torch.equal(out, x * 3.0)
    assert model.calls == [{"args": 0, "kwargs": ["scale", "x"], "training": True}]  # not the label `y`


def test_positional_forces_positional():
    model = PositionalNet()
    x = torch.randn(2, 3)
    batch = unpack_batch({"x": x, "labels": torch.tensor([0, 1])})
    InputRouting("positional")(model, batch)
    assert model.calls[-1]["args"] == 1 and model.calls[-1]["kwargs"] == []
    keyword = KeywordStudent()
    InputRouting("positional")(keyword, unpack_batch(token_batch(2)))
    assert keyword.calls[-1] == {"args": 1, "kwargs": [], "training": True}  # input_ids only, positionally


def test_keywords_with_a_model_that_accepts_none_of_the_keys():
    with pytest.raises(ValueError, match=re.escape("keyword input routing: PositionalNet.forward accepts none of the batch's inputs ['image'] by name (it takes ['x']).")):
        InputRouting("keywords")(PositionalNet(), unpack_batch({"image": torch.zeros(2, 3), "label": torch.zeros(2)}))


def test_keywords_passes_only_accepted_names_or_everything_to_var_keywords():
    student = KeywordStudent()
    InputRouting("keywords")(student, unpack_batch(token_batch(2)))
    assert student.calls[-1]["kwargs"] == ["attention_mask", "input_ids"]
    anything = VarKeywordModel()
    InputRouting("keywords")(anything, unpack_batch(token_batch(2)))
    assert anything.calls[-1]["kwargs"] == ["attention_mask", "input_ids", "token_type_ids"]


@pytest.mark.parametrize("bad", ["bogus", "Auto", ""])
def test_bad_routing_mode(bad):
    with pytest.raises(ValueError, match=re.escape(f"input routing must be one of ('auto', 'positional', 'keywords'), a KeywordInputs or a callable (model, batch) -> output, got {bad!r}.")):
        InputRouting(bad)
    with pytest.raises(ValueError, match=r"^`inputs`: input routing must be one of"):
        resolve_routing(bad)
    with pytest.raises(ValueError, match=r"^`inputs`: input routing must be one of"):
        DistillationModule(KeywordStudent(), BertLikeTeacher(), objectives={"task": CrossEntropy()}, inputs=bad)
    with pytest.raises(ValueError, match=r"^`teacher inputs`: input routing must be one of"):
        FrozenTeacher(BertLikeTeacher(), inputs=bad)


def test_non_callable_routing_is_a_type_error():
    with pytest.raises(TypeError, match=re.escape("`inputs` must be 'auto', 'positional', 'keywords', a KeywordInputs or a callable (model, batch) -> output, got int.")):
        DistillationModule(KeywordStudent(), None, objectives={"task": CrossEntropy()}, inputs=3)


def test_keyword_inputs_keys_and_rename():
    class Renamed(Recording):
        def forward(self, ids, mask=None):
            return ids.float().sum(-1)

    raw = token_batch(3)
    model = Renamed()
    route = KeywordInputs(keys=["input_ids", "attention_mask"], rename={"input_ids": "ids", "attention_mask": "mask"})
    out = route(model, unpack_batch(raw))
    assert model.calls[-1]["kwargs"] == ["ids", "mask"]
    assert torch.equal(out, raw["input_ids"].float().sum(-1))
    only_ids = KeywordInputs(keys="input_ids", rename={"input_ids": "ids"})  # a single key as a string
    assert only_ids.keys == ["input_ids"]
    only_ids(model, unpack_batch(raw))
    assert model.calls[-1]["kwargs"] == ["ids"]
    assert repr(only_ids) == "KeywordInputs(keys=['input_ids'], rename={'input_ids': 'ids'})"


def test_keyword_inputs_errors():
    with pytest.raises(ValueError, match=re.escape("KeywordInputs: the batch has no entries ['pixels']; it has ['attention_mask', 'input_ids', 'token_type_ids'].")):
        KeywordInputs(keys=["input_ids", "pixels"])(KeywordStudent(), unpack_batch(token_batch(2)))
    with pytest.raises(ValueError, match=r"^KeywordInputs routes named batch entries, but this batch is a tuple / tensor"):
        KeywordInputs()(KeywordStudent(), unpack_batch((torch.zeros(2, 3, dtype=torch.long), torch.zeros(2))))


def test_keyword_inputs_default_keys_are_the_accepted_ones():
    student = KeywordStudent()
    KeywordInputs()(student, unpack_batch(token_batch(2)))
    assert student.calls[-1]["kwargs"] == ["attention_mask", "input_ids"]


def test_callable_routing():
    model = PositionalNet()
    x = torch.randn(2, 3)
    out = call_model(model, unpack_batch({"pixels": x, "x": torch.zeros(2, 3)}), lambda m, b: m(b.inputs["pixels"]))
    assert torch.equal(out, model.linear(x))


def test_bert_teacher_gets_token_type_ids_the_student_does_not():
    """A BERT teacher gets token_type_ids, a student that does not take them does not."""
    student, teacher = KeywordStudent(), BertLikeTeacher()
    module = DistillationModule(student, teacher, objectives={"task": CrossEntropy(0.5), "kd": LogitKD(0.5, 2.0)})
    raw = token_batch(4)
    terms, b = module.training_terms(raw)
    assert student.calls == [{"args": 0, "kwargs": ["attention_mask", "input_ids"], "training": True}]
    assert teacher.calls == [{"args": 0, "kwargs": ["attention_mask", "input_ids", "token_type_ids"], "training": False}]
    with torch.no_grad():
        s = logits_of(student(input_ids=raw["input_ids"], attention_mask=raw["attention_mask"]))
        t = logits_of(teacher(**{k: raw[k] for k in ("input_ids", "attention_mask", "token_type_ids")}))
    torch.testing.assert_close(terms["kd_loss"], kd_loss(s, t, 2.0))
    torch.testing.assert_close(terms["task_loss"], F.cross_entropy(s, raw["labels"]))
    # and token_type_ids do change the teacher's output (so receiving them matters)
    with torch.no_grad():
        without = logits_of(teacher(input_ids=raw["input_ids"], attention_mask=raw["attention_mask"]))
    assert not torch.allclose(without, t)


def test_teacher_has_its_own_routing():
    student, teacher = KeywordStudent(), BertLikeTeacher()
    source = FrozenTeacher(teacher, inputs=KeywordInputs(keys=["input_ids", "token_type_ids"]))
    module = DistillationModule(student, source, objectives={"kd": LogitKD(1.0, 2.0)}, inputs="positional")
    module.training_terms(token_batch(3))
    assert teacher.calls[-1]["kwargs"] == ["input_ids", "token_type_ids"]  # no attention_mask: as listed
    assert student.calls[-1] == {"args": 1, "kwargs": [], "training": True}  # input_ids positionally
    assert source.module is teacher and not teacher.training


def test_module_forward_and_predict_route_dicts():
    student = KeywordStudent()
    module = DistillationModule(student, None, objectives={"task": CrossEntropy()})
    raw = token_batch(3)
    out = module({"input_ids": raw["input_ids"], "attention_mask": raw["attention_mask"]})
    assert student.calls[-1]["kwargs"] == ["attention_mask", "input_ids"]
    assert logits_of(out).shape == (3, TOKEN_CLASSES)
    logits = module.predict_step(raw, 0)
    assert student.calls[-1]["kwargs"] == ["attention_mask", "input_ids"] and logits.shape == (3, TOKEN_CLASSES)


class NoLogits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x):
        return {"scores": self.linear(x.flatten(1))}


class StringOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(1, 1)

    def forward(self, x):
        return "logits"


def test_bad_model_outputs_name_the_model_in_a_training_step():
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    kd = {"task": CrossEntropy(), "kd": LogitKD()}
    with pytest.raises(ValueError, match=re.escape("the student returned a dict without a 'logits' entry (keys: ['scores'])")):
        DistillationModule(NoLogits(), ImageNet(), objectives=kd).training_terms((x, y))
    with pytest.raises(ValueError, match=re.escape("the teacher returned a dict without a 'logits' entry (keys: ['scores'])")):
        DistillationModule(ImageNet(), NoLogits(), objectives=kd).training_terms((x, y))
    with pytest.raises(TypeError, match=r"^the teacher returned a str; distillation needs a logits tensor"):
        DistillationModule(ImageNet(), StringOutput(), objectives=kd).training_terms((x, y))


# ============================================================================================
# End to end: the logit strategies with dict / object outputs and keyword inputs
# ============================================================================================

T = 2.0


def adam(params):
    return torch.optim.Adam(params, lr=0.02)


@dataclass
class Case:
    """A data source and models: ``students`` / ``teachers`` factories, ``loaders`` or a ``datamodule``."""

    name: str
    student: Any
    teacher: Any
    mt_teacher: Any  # teachers of the multi-teacher preset (they return dicts)
    keyword: bool


CASES = [
    Case("dict_student-object_teacher-datamodule", lambda: ImageNet("dict"), lambda: ImageNet("object", hidden=24),
         lambda: ImageNet("dict", hidden=24), keyword=False),
    Case("object_student-dict_teacher-dataloader", lambda: ImageNet("object"), lambda: ImageNet("dict", hidden=24),
         lambda: ImageNet("dict", hidden=20), keyword=False),
    Case("keyword_student-keyword_teacher-dict_dataloader", lambda: KeywordStudent("dict"),
         lambda: BertLikeTeacher("object"), lambda: PositionalTokenTeacher(), keyword=True),
]


def image_loader(n: int = 48, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    y = (x.flatten(1)[:, :10].argmax(-1))  # a learnable rule
    return DataLoader(TensorDataset(x, y), batch_size=16)


def token_loader(n: int = 48, seed: int = 0) -> DataLoader:
    return DataLoader(TokenDataset(n, seed), batch_size=16)


def build(preset: str, case: Case):
    """``(module, students, teachers)`` of ``preset`` with ``case``'s models."""
    torch.manual_seed(0)
    student = case.student()
    common = dict(alpha=0.5, optimizer=adam)
    if preset == "KnowledgeDistillation":
        teacher = case.teacher()
        return KnowledgeDistillation(student, teacher, temperature=T, **common), [student], [teacher]
    if preset == "CTKD":
        teacher = case.teacher()
        return CTKD(student, teacher, init_temperature=3.0, lambda_epochs=1, **common), [student], [teacher]
    if preset == "MultiTeacherDistillation":
        teachers = [case.mt_teacher(), case.mt_teacher()]
        return MultiTeacherDistillation(student, teachers, temperature=T, **common), [student], teachers
    if preset == "MutualLearning":
        teacher = case.teacher()
        module = MutualLearning(student, teacher, num_students=2, temperature=T, seed=0, **common)
        return module, list(module.students), [teacher]
    if preset == "BornAgain":
        teacher = case.teacher()
        return BornAgain(student, generations=1, teacher=teacher, temperature=T, seed=0, **common), [student], [teacher]
    if preset == "QuantAwareDistillation":
        teacher = case.teacher()
        return QuantAwareDistillation(student, teacher, bits=4, temperature=T, **common), [student], [teacher]
    raise AssertionError(preset)


def raw_logits(model: nn.Module, batch: Any, keyword: bool, teacher: bool = False) -> Tensor:
    """The model's logits for a raw batch, called by hand with the arguments its forward takes."""
    if keyword:
        if isinstance(model, BertLikeTeacher):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        token_type_ids=batch["token_type_ids"])
        elif isinstance(model, PositionalTokenTeacher):
            out = model(batch["input_ids"])
        else:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    else:
        out = model(batch[0])
    return logits_of(out)


def expected_kd_term(preset: str, module, students, teachers, batch, keyword) -> Tensor:
    """The KD term recomputed from the models' logits with ``kd_loss`` (or its definition, written out)."""
    with torch.no_grad():
        s = [raw_logits(m, batch, keyword) for m in students]
        t = [raw_logits(m, batch, keyword) for m in teachers]
    if preset in ("KnowledgeDistillation", "BornAgain", "QuantAwareDistillation"):
        return kd_loss(s[0], t[0], T)
    if preset == "CTKD":
        return kd_loss(s[0], t[0], module.temperature)
    if preset == "MultiTeacherDistillation":  # mean weighting: the average of the softened teachers, written out
        mix = (F.softmax(t[0] / T, -1) + F.softmax(t[1] / T, -1)) / 2
        return (mix * (mix.log() - F.log_softmax(s[0] / T, -1))).sum(-1).mean() * T**2
    if preset == "MutualLearning":  # each student mimics its peer and the teacher; the term is the mean
        per_student = [(kd_loss(s[k], s[1 - k], T) + kd_loss(s[k], t[0], T)) / 2 for k in range(2)]
        return sum(per_student) / 2
    raise AssertionError(preset)


PRESETS = ["KnowledgeDistillation", "CTKD", "MultiTeacherDistillation", "MutualLearning", "BornAgain",
           "QuantAwareDistillation"]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_end_to_end(preset, case, make_trainer, single_thread):
    module, students, teachers = build(preset, case)
    teacher_before = [{k: v.clone() for k, v in t.state_dict().items()} for t in teachers]
    student_before = [{k: v.clone() for k, v in s.state_dict().items()} for s in students]
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = make_trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=0,
                           log_every_n_steps=1, callbacks=[Record()])
    if case.keyword:
        loader = token_loader()
        trainer.fit(module, train_dataloaders=loader, val_dataloaders=token_loader(16, seed=5))
        batch = next(iter(loader))
    elif case.name.endswith("datamodule"):
        from lightning_distill.data import DigitsDataModule

        dm = DigitsDataModule(batch_size=16, shuffle_seed=0)
        trainer.fit(module, datamodule=dm)
        x, y, _ = next(iter(dm.train_dataloader()))
        batch = (x, y)
    else:
        loader = image_loader()
        trainer.fit(module, train_dataloaders=loader, val_dataloaders=image_loader(16, seed=5))
        batch = next(iter(loader))

    assert trainer.global_step == 6 and len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert "val/acc" in trainer.callback_metrics
    # every student learned, every teacher is bit-identical, frozen and in eval mode
    for s, before in zip(students, student_before):
        assert any(not torch.equal(s.state_dict()[k], v) for k, v in before.items())
    for t, before in zip(teachers, teacher_before):
        assert t.state_dict().keys() == before.keys()
        assert all(torch.equal(t.state_dict()[k], v) for k, v in before.items())
        assert not any(m.training for m in t.modules()) and not any(p.requires_grad for p in t.parameters())
        assert t.calls and not any(call["training"] for call in t.calls)  # never run in train mode
    assert any(call["training"] for call in students[0].calls)
    if not case.keyword:
        assert {(c["args"], tuple(c["kwargs"])) for m in students + teachers for c in m.calls} == {(1, ())}
    if case.keyword:  # what each model received during the fit
        assert {tuple(c["kwargs"]) for c in students[0].calls} == {("attention_mask", "input_ids")}
        if isinstance(teachers[0], BertLikeTeacher):
            assert {tuple(c["kwargs"]) for c in teachers[0].calls} == {("attention_mask", "input_ids", "token_type_ids")}
        else:
            assert {(c["args"], tuple(c["kwargs"])) for c in teachers[0].calls} == {(1, ())}

    # one batch: the KD term equals kd_loss recomputed from the models' logits
    module.eval()
    terms, b = module.training_terms(batch)
    target = batch["labels"] if case.keyword else batch[1]
    assert torch.equal(b.target, target)
    expected = expected_kd_term(preset, module, students, teachers, batch, case.keyword)
    torch.testing.assert_close(terms["kd_loss"].float(), expected.float(), rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        ce = torch.stack([F.cross_entropy(raw_logits(s, batch, case.keyword), target) for s in students]).mean()
    torch.testing.assert_close(terms["task_loss"], ce, rtol=1e-4, atol=1e-6)
    assert float(terms["kd_loss"].detach()) > 0


def test_loss_decreases_with_keyword_models(make_trainer, single_thread):
    """A longer KD run on token dicts: the training loss goes down (alpha = 0.5: labels and teacher)."""
    torch.manual_seed(0)
    module = KnowledgeDistillation(KeywordStudent(dim=16), BertLikeTeacher(), temperature=T, alpha=0.5,
                                   optimizer=lambda p: torch.optim.Adam(p, lr=0.05))
    batch = next(iter(token_loader(48)))
    with torch.no_grad():
        module.eval()
        before = float(module.training_terms(batch)[0]["loss"])
    module.train()
    trainer = make_trainer(max_epochs=15, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=token_loader(48))
    with torch.no_grad():
        module.eval()
        after = float(module.training_terms(batch)[0]["loss"])
    assert after < 0.8 * before, (before, after)


# ============================================================================================
# Keyword teachers beyond the single frozen teacher (found while writing the tests above)
# ============================================================================================


def test_multi_teacher_keyword_teachers_get_their_keywords():
    teachers = [BertLikeTeacher("dict"), BertLikeTeacher("dict")]
    module = MultiTeacherDistillation(KeywordStudent(), teachers, temperature=T)
    module.training_terms(token_batch(4))
    for t in teachers:
        assert t.calls[-1]["kwargs"] == ["attention_mask", "input_ids", "token_type_ids"]


def test_cached_keyword_teacher_matches_the_live_teacher(make_trainer, single_thread, tmp_path):
    from lightning_distill.cache import TeacherCache

    torch.manual_seed(0)
    teacher = BertLikeTeacher()
    module = KnowledgeDistillation(KeywordStudent(), teacher, temperature=T,
                                   teacher_cache=TeacherCache(storage="memory", progress=False))
    loader = DataLoader(TokenDataset(32, index=True), batch_size=16)
    trainer = make_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=loader)
    batch = next(iter(loader))
    cached = module.teacher_source.outputs(unpack_batch(batch)).logits
    with torch.no_grad():
        live = raw_logits(teacher, batch, keyword=True)
    torch.testing.assert_close(cached, live)


class MaskRequiredStudent(KeywordStudent):
    """``attention_mask`` is required: a positional call cannot silently drop it."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Any:
        return super().forward(input_ids, attention_mask)


@pytest.mark.parametrize("kind", ["dict_output", "keyword_input"])
def test_born_again_two_generations_with_dict_or_keyword_students(kind, make_trainer, single_thread):
    torch.manual_seed(0)
    student = ImageNet("dict") if kind == "dict_output" else MaskRequiredStudent("object")
    loader = image_loader if kind == "dict_output" else token_loader
    module = BornAgain(student, generations=2, epochs_per_generation=1, seed=0, alpha=0.5, temperature=T)
    trainer = make_trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=loader(), val_dataloaders=loader(16, seed=5))
    assert module.generation == 2 and len(module.generation_models) == 1
    assert "val/ensemble_acc" in trainer.callback_metrics


class RenamedStudent(Recording):
    """``forward(self, ids, mask)``: needs ``KeywordInputs(rename=...)`` to read token dicts."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim)
        self.head = nn.Linear(dim, TOKEN_CLASSES)

    def forward(self, ids: Tensor, mask: Tensor) -> dict[str, Tensor]:
        m = mask.unsqueeze(-1).float()
        return {"logits": self.head((self.emb(ids) * m).sum(1) / m.sum(1).clamp_min(1.0))}


RENAME = KeywordInputs(keys=["input_ids", "attention_mask"], rename={"input_ids": "ids", "attention_mask": "mask"})


def test_renamed_keyword_student_trains_with_a_keyword_teacher(make_trainer, single_thread):
    torch.manual_seed(0)
    student, teacher = RenamedStudent(), BertLikeTeacher()
    module = KnowledgeDistillation(student, teacher, temperature=T, inputs=RENAME, optimizer=adam)
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=token_loader(), val_dataloaders=token_loader(16, seed=5))
    assert {tuple(c["kwargs"]) for c in student.calls} == {("ids", "mask")}
    assert {tuple(c["kwargs"]) for c in teacher.calls} == {("attention_mask", "input_ids", "token_type_ids")}
    assert "val/acc" in trainer.callback_metrics


def test_born_again_generation_teacher_uses_the_students_routing(make_trainer, single_thread):
    torch.manual_seed(0)
    module = BornAgain(RenamedStudent(), generations=2, epochs_per_generation=1, seed=0, inputs=RENAME)
    trainer = make_trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=token_loader())
    assert module.generation == 2
    finished = module.generation_models[0]
    assert finished.calls and {tuple(c["kwargs"]) for c in finished.calls} == {("ids", "mask")}
