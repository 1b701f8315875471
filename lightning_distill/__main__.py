"""``python -m lightning_distill`` is the same as the ``lightning-distill`` command."""

from lightning_distill.cli import main

if __name__ == "__main__":
    main()
