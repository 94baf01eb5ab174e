"""Where the ``native`` backend's CUDA kernels beat Triton's: a table measured on a GPU, never guessed.

The GPU script (``bench/gpu_run.py``) times both backends over its shapes and writes the table as
``native_crossover.json`` in its results folder (``from_bench_rows``). The automatic backend choice
reads it from ``$FUSEDADAPTERS_CROSSOVER`` when set, else from ``fusedadapters/ops/native_crossover.json``
(a measured table committed into the package); without a table, CUDA tensors stay on Triton.

A table::

    {"schema": 1, "device": "NVIDIA H100 80GB HBM3", "capability": "9.0", "source": "<results folder>",
     "rules": [{"mode": "forward", "dtype": "bf16", "d": 4096, "h": 64, "native_up_to_rows": 32,
                "rows_measured": [1, 2, 4, 8, 16, 32, 64, 1024]}, ...]}

``native_up_to_rows`` is the largest measured N such that native was at least as fast as Triton at
every measured N up to it (0: never). A call picks native only on a device of the table's compute
capability, for the rule's exact (mode, dtype, D, H), at most ``native_up_to_rows`` rows and at most
the largest N measured: nothing is extrapolated. ``mode`` is ``forward`` for calls that record no
gradient, ``full`` (forward and backward) for the others.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import torch

__all__ = ["CROSSOVER_ENV_VAR", "PACKAGED_TABLE", "from_bench_rows", "load_table", "native_wins"]

CROSSOVER_ENV_VAR = "FUSEDADAPTERS_CROSSOVER"
PACKAGED_TABLE = Path(__file__).with_name("native_crossover.json")
SCHEMA = 1
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def from_bench_rows(rows: Iterable[Dict[str, Any]], device: str, capability: str, source: str) -> Dict[str, Any]:
    """The table from benchmark rows (``bench_linear_adapter.py``'s ``mode, dtype, n, d, h, backend, ms,
    status``): one rule per (mode, dtype, D, H) where both backends have a time at some N."""
    times: Dict[tuple, Dict[int, Dict[str, float]]] = {}
    for r in rows:
        if r.get("backend") in ("native", "triton") and r.get("status") == "ok" and r.get("ms"):
            key = (r["mode"], r["dtype"], int(r["d"]), int(r["h"]))
            times.setdefault(key, {}).setdefault(int(r["n"]), {})[r["backend"]] = float(r["ms"])
    rules: List[Dict[str, Any]] = []
    for (mode, dtype, d, h), by_n in sorted(times.items()):
        both = sorted(n for n, t in by_n.items() if len(t) == 2)
        if not both:
            continue
        up_to = 0
        for n in both:
            if by_n[n]["native"] > by_n[n]["triton"]:
                break
            up_to = n
        rules.append({"mode": mode, "dtype": dtype, "d": d, "h": h, "native_up_to_rows": up_to,
                      "rows_measured": both})
    return {"schema": SCHEMA, "device": device, "capability": capability, "source": source, "rules": rules}


@functools.lru_cache(maxsize=None)
def _read(path: str) -> Optional[Dict[str, Any]]:
    file = Path(path)
    if not file.is_file():
        return None
    table = json.loads(file.read_text())
    if table.get("schema") != SCHEMA or not isinstance(table.get("rules"), list):
        raise ValueError(f"{file} is not a native crossover table of schema {SCHEMA}")
    return table


def load_table() -> Optional[Dict[str, Any]]:
    """The table in use (``$FUSEDADAPTERS_CROSSOVER``, else the packaged one), or None."""
    path = os.environ.get(CROSSOVER_ENV_VAR)
    if path and not Path(path).is_file():
        raise FileNotFoundError(f"${CROSSOVER_ENV_VAR} names {path}, which is not a file")
    return _read(path or str(PACKAGED_TABLE))


def native_wins(device: torch.device, dtype: torch.dtype, d: int, h: int, rows: int, training: bool) -> bool:
    """Whether the measured table puts native at least level with Triton for this call on ``device``."""
    if device.type != "cuda" or dtype not in DTYPE_NAMES:
        return False
    up_to = native_up_to_rows(device.index if device.index is not None else torch.cuda.current_device(),
                              "full" if training else "forward", DTYPE_NAMES[dtype], int(d), int(h))
    return 0 < rows <= up_to


@torch.compiler.assume_constant_result
def native_up_to_rows(device_index: int, mode: str, dtype: str, d: int, h: int) -> int:
    """The rule's ``native_up_to_rows`` for this GPU and (mode, dtype, D, H), 0 without one (a constant of
    the graphs that ``torch.compile`` traces through the op)."""
    table = load_table()
    if table is None:
        return 0
    major, minor = torch.cuda.get_device_capability(device_index)
    if table.get("capability") != f"{major}.{minor}":
        return 0
    for rule in table["rules"]:
        if (rule["mode"], rule["dtype"], rule["d"], rule["h"]) == (mode, dtype, d, h):
            return int(rule["native_up_to_rows"])
    return 0
