"""The command line ``python -m lightning_distill.data_free``, read off :func:`deep_inversion` itself.

Every argument of :func:`~lightning_distill.data_free.deep_inversion` that a command line can
express becomes a flag named after it with dashes (``batch_size`` -> ``--batch-size``), with the
type and default of the signature and the help of the docstring's ``Args:`` section, so an option
added to the synthesis appears here without being written a second time. Annotations map to
flags as follows:

* ``int`` / ``float`` / ``str``, or a ``Union`` that holds ``str`` (a device): one value;
* ``Literal[...]``: one of its values;
* ``Sequence[X]``: one or more values (``--input-shape 1 8 8``); ``tuple[X, X]``: exactly two;
* ``bool``: a switch -- ``--flip`` turns a ``False`` default on, ``--no-progress`` a ``True`` one off;
* ``Optional[X]``: as ``X``, keeping the default when the flag is absent.

An argument without a default is a required flag. The teacher is built from ``--teacher-model``
and ``--teacher`` (weights: a file or ``zoo:NAME``); ``targets``, a tensor, has no flag (the
classes are balanced). The command line adds ``--out``, ``--overwrite``, ``--no-clamp``
(``input_range=None``) and ``--num-threads``.

Example::

    >>> from lightning_distill.data_free.cli import _parser
    >>> args = _parser().parse_args(["--teacher-model", "digits_cnn", "--teacher", "zoo:digits_cnn",
    ...     "--num-classes", "10", "--input-shape", "1", "8", "8", "--num-samples", "20", "--out", "x.pt",
    ...     "--flip", "--no-progress"])
    >>> args.input_shape, args.num_samples, args.flip, args.progress, args.batch_size, args.input_range
    ([1, 8, 8], 20, True, False, 256, (0.0, 1.0))
"""

from __future__ import annotations

import argparse
import collections.abc
import inspect
import sys
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence, Union, get_args, get_origin, get_type_hints

import docstring_parser
import torch

from lightning_distill.data_free.files import save_transfer_set
from lightning_distill.data_free.synthesis import deep_inversion

__all__ = ["main"]

#: arguments of deep_inversion without a flag: the teacher is built from --teacher-model / --teacher,
#: and the targets are a tensor (balanced classes when absent)
_NO_FLAG = frozenset({"teacher", "targets"})


def _flag_for(name: str, annotation: Any, default: Any) -> tuple[str, dict[str, Any]]:
    """The flag and the ``add_argument`` keywords of one parameter, from its annotation and default."""
    required = default is inspect.Parameter.empty
    args = get_args(annotation)
    if get_origin(annotation) is Union and type(None) in args:  # Optional[X]: as X
        inner = tuple(a for a in args if a is not type(None))
        annotation = inner[0] if len(inner) == 1 else Union[inner]
        args = get_args(annotation)
    origin = get_origin(annotation)
    flag = "--" + name.replace("_", "-")
    if annotation is bool and not required:
        if default:
            return "--no-" + flag[2:], {"action": "store_false", "dest": name}
        return flag, {"action": "store_true"}
    if origin is Literal:
        kwargs: dict[str, Any] = {"type": type(args[0]), "choices": args}
    elif origin is tuple and args and Ellipsis not in args and len(set(args)) == 1:
        kwargs = {"type": args[0], "nargs": len(args), "metavar": args[0].__name__.upper()}
    elif origin in (tuple, list, collections.abc.Sequence) and len(args) in (1, 2) and args[-1] in (args[0], Ellipsis):
        kwargs = {"type": args[0], "nargs": "+", "metavar": args[0].__name__.upper()}
    elif origin is Union and str in args:
        kwargs = {"type": str}
    elif annotation in (int, float, str):
        kwargs = {"type": annotation}
    else:
        raise TypeError(
            f"parameter `{name}` ({annotation!r}) has no command-line form: give it a simple type or list it in "
            "_NO_FLAG and build its value in _run."
        )
    return flag, {**kwargs, "required": required} if required else {**kwargs, "default": default}


def add_function_options(parser: Any, function: Callable, skip: frozenset[str] = frozenset()) -> list[str]:
    """Add a flag for every parameter of ``function`` not in ``skip``; return the parameter names.

    Types and defaults come from the signature, help texts from the Google-style ``Args:`` section
    of the docstring. ``parser`` is an ``argparse.ArgumentParser`` or an argument group.
    """
    hints = get_type_hints(function)
    docs = {p.arg_name: p.description for p in docstring_parser.parse(function.__doc__ or "").params}
    names = []
    for name, param in inspect.signature(function).parameters.items():
        if name in skip:
            continue
        flag, kwargs = _flag_for(name, hints[name], param.default)
        text = " ".join((docs.get(name) or "").split()).replace("%", "%%")
        if kwargs.get("action") == "store_false":
            text = f"{name}=False; {name}: {text}"
        elif "default" in kwargs and "action" not in kwargs:
            text += " (default: %(default)s)"
        parser.add_argument(flag, help=text, **kwargs)
        names.append(name)
    return names


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lightning_distill.data_free",
        description="Synthesise a transfer set from a teacher alone with DeepInversion (Yin et al. 2020, "
        "arXiv:1912.08795) and save it as a .pt file with an 'inputs' key.",
    )
    p.add_argument("--teacher-model", required=True, help="model name for lightning_distill.models.get_model")
    p.add_argument("--teacher", required=True, help="teacher weights: a file or zoo:NAME (e.g. zoo:digits_cnn)")
    p.add_argument("--out", required=True, help="output .pt file")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-clamp", action="store_true", help="do not clamp inputs (input_range=None)")
    p.add_argument(
        "--num-threads", type=int, default=1,
        help="torch intra-op CPU threads (default 1: the per-step tensors are tiny, and on a busy machine extra "
        "threads make each step many times slower); 0 keeps torch's default",
    )  # fmt: skip
    group = p.add_argument_group("synthesis", "the arguments of lightning_distill.data_free.deep_inversion")
    p.set_defaults(synthesis_options=add_function_options(group, deep_inversion, skip=_NO_FLAG))
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (``python -m lightning_distill.data_free --help``)."""
    args = _parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        print(f"error: --out {str(out)!r} exists; pass --overwrite to replace it.", file=sys.stderr)
        return 2
    try:
        return _run(args, out)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, out: Path) -> int:
    from lightning_distill.checkpoint import load_weights
    from lightning_distill.models import get_model

    if args.num_threads < 0:
        raise ValueError(f"`--num-threads` must be >= 0 (0 keeps torch's default), got {args.num_threads!r}.")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    teacher = get_model(args.teacher_model, args.num_classes)
    load_weights(teacher, args.teacher, argument="--teacher")
    if args.device is not None:
        teacher = teacher.to(args.device)
    teacher.eval()
    options = {name: getattr(args, name) for name in args.synthesis_options}
    if args.no_clamp:
        options["input_range"] = None
    result = deep_inversion(teacher, **options)
    result["meta"]["teacher_model"] = args.teacher_model
    result["meta"]["teacher_weights"] = str(args.teacher)
    save_transfer_set(result, out, overwrite=args.overwrite)
    n = len(result["targets"])
    print(
        f"teacher accuracy on the synthetic set: {100 * result['teacher_acc']:.1f}% "
        f"({round(result['teacher_acc'] * n)}/{n})"
    )
    print(f"time: {result['meta']['time_s']:.1f} s")
    print(f"wrote {out}")
    return 0
