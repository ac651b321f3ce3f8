"""What every experiment shares: the commit of the code it runs, its results file (one JSON line per row, reruns
skip rows already there), and the held-out evaluation tokens."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import numpy as np

import afpq_jax as aq
from afpq_jax import assets


def commit() -> str:
    """The short commit of the working tree's HEAD ("unknown" outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Results:
    """A JSON-lines results file: ``done`` maps each row's key (``key(record)``) to its record; `add` appends a
    record (and prints it)."""

    def __init__(self, path: str | Path, key: Callable[[dict], Hashable | None], *, also: tuple[str | Path, ...] = ()):
        self.path, self.key = Path(path), key
        self.done: dict[Hashable, dict] = {}
        for p in (*also, self.path):
            if Path(p).exists():
                for line in Path(p).read_text().splitlines():
                    record = json.loads(line)
                    k = key(record)
                    if k is not None:
                        self.done[k] = record

    def __contains__(self, key: Hashable) -> bool:
        return key in self.done

    def add(self, record: dict[str, Any], *, quiet: tuple[str, ...] = ()) -> dict[str, Any]:
        """Appends ``record`` and prints it (without the ``quiet`` keys: long histories)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done[self.key(record)] = record
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps({k: v for k, v in record.items() if k not in quiet}), flush=True)
        return record


def heldout_ids(model_path: str | Path) -> np.ndarray:
    """The held-out Wikipedia split as the model's token ids (what every perplexity table scores)."""
    return aq.tokenize(aq.load_tokenizer(model_path), assets.wiki_text()[1])


def format_label(fmt: str, asym: bool) -> str:
    """A table row's name: INT4, NF3-asym, FP4-sym (INT formats are asymmetric min/max: no suffix)."""
    base = {"fp4_e2m1": "FP4", "fp3_e2m0": "FP3"}.get(fmt, fmt.upper())
    return base if fmt.startswith("int") else f"{base}-{'asym' if asym else 'sym'}"
