"""Stand-in for wandb: every wandb.log(dict, step=) call is appended as one JSON line to $OFFRL_REF_LOG.
Only for benchmarks/reference (no account, no network)."""

from __future__ import annotations

import json
import os


class _Run:
    def save(self, *_, **__) -> None:
        pass


run = _Run()


def init(config=None, **kw):
    log({"config": config or {}}, step=-1)
    return run


def log(data: dict, step: int | None = None, **_) -> None:
    with open(os.environ["OFFRL_REF_LOG"], "a") as f:
        f.write(json.dumps({"step": step, **{k: (v if isinstance(v, (int, float, str, dict, list)) or v is None
                                                 else float(v)) for k, v in data.items()}}) + "\n")


def finish(*_, **__) -> None:
    pass
