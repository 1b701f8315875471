"""``python -m lightning_distill.data_free``: see :mod:`lightning_distill.data_free.cli`."""

from lightning_distill.data_free.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
