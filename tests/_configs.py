"""The YAML files under ``configs/``: runnable configs, the shared blocks they load, and their resolved content."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
ALL_YAML = sorted(CONFIG_DIR.glob("**/*.yaml"))
# a runnable config has a model; the rest (configs/<dataset>/shared/*.yaml) are blocks that configs load
RUNNABLE_CONFIGS = [p for p in ALL_YAML if "model" in (yaml.safe_load(p.read_text()) or {})]
SHARED_FILES = [p for p in ALL_YAML if p not in RUNNABLE_CONFIGS]


def referenced_files(config: Path) -> set[Path]:
    """The YAML files a config loads: string values anywhere in it that name an existing ``.yaml`` file,
    relative to the config's directory (``trainer: shared/trainer.yaml``, ``labeled: shared/data.yaml``)."""
    found: set[Path] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str) and value.endswith((".yaml", ".yml")):
            path = (config.parent / value).resolve()
            if path.is_file():
                found.add(path)

    walk(yaml.safe_load(config.read_text()))
    return found


def resolved_spec(config: Path) -> dict[str, Any]:
    """The config as a dict with every loaded file (see :func:`referenced_files`) put in place of its path."""

    def resolve(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v) for v in value]
        if isinstance(value, str) and value.endswith((".yaml", ".yml")) and (config.parent / value).is_file():
            return resolve(yaml.safe_load((config.parent / value).read_text()))
        return value

    return resolve(yaml.safe_load(config.read_text()))
