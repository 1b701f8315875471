"""``python -m lightning_distill.zoo export CHECKPOINT OUTPUT`` -- see :mod:`lightning_distill.zoo`."""

from __future__ import annotations

import argparse

from lightning_distill.zoo import export


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_distill.zoo")
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="save a training checkpoint's network weights as a plain state dict")
    exp.add_argument("checkpoint", help="Lightning checkpoint of a Classifier run (or a state dict)")
    exp.add_argument("output", help="where to write the .pt state dict")
    args = parser.parse_args(argv)
    out = export(args.checkpoint, args.output)
    print(f"wrote {out} ({out.stat().st_size / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
