"""Waiting for W&B's offline run file on the real event, not on a clock."""

from __future__ import annotations


def finish_wandb() -> None:
    """Finish the current W&B run and shut W&B's service process down.

    The service process writes the offline ``*.wandb`` run file asynchronously, so the file may still be
    incomplete when ``wandb.finish()`` returns; ``wandb.teardown()`` sends the service its teardown message
    and waits for the process to exit, after which every record is on disk. The next ``wandb.init`` starts a
    new service.
    """
    import wandb

    wandb.finish()
    wandb.teardown()
