"""Shared benchmark plumbing: the one byte-accounting function, timing with CUDA events, result records."""
from __future__ import annotations

import datetime
import json
import os
import subprocess

import numpy as np


def bytes_per_row(op: str, dtype: str, hidden: int) -> int:
    """Bytes of one token row as DeepEP counts them: bf16 2H; FP8 H + 4 * H/128 (scales)."""
    if dtype == "bf16":
        return 2 * hidden
    if dtype == "fp8":
        return hidden + 4 * (hidden // 128)
    raise ValueError(dtype)


def byte_counts(op: str, dtype: str, hidden: int, rows_total: int, rows_remote: int) -> tuple[int, int]:
    """(logical, physical) bytes of one call at one rank (SPEC 8).

    Normal dispatch/combine: logical = rows received (dispatch) or sent back (combine) incl. local rows x bytes per
    row ("bottleneck bandwidth"); physical = only the rows that cross NVLink. Low-latency: rows are (token, k)
    messages, same rule. rows_total / rows_remote are counted at this rank."""
    b = bytes_per_row(op, dtype, hidden)
    return rows_total * b, rows_remote * b


def median_us(samples_ms) -> float:
    return float(np.median(np.asarray(samples_ms))) * 1e3


def commit() -> str:
    """The commit measured: EPCOMM_COMMIT if set (GPU machines get a copy of the tree without .git), else git."""
    if os.environ.get("EPCOMM_COMMIT"):
        return os.environ["EPCOMM_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], stderr=subprocess.DEVNULL,
                                       cwd=os.path.dirname(__file__)).decode().strip() or "unknown"
    except Exception:
        return "unknown"


def record(op, dtype, ranks, gpus, tokens, hidden, topk, experts, num_sms, med_us, logical, physical, card,
           baseline=None, **extra) -> dict:
    return dict(op=op, dtype=dtype, ranks=ranks, gpus=gpus, tokens=tokens, hidden=hidden, topk=topk, experts=experts,
                num_sms=num_sms, median_us=round(med_us, 2),
                logical_gbps=round(logical / (med_us * 1e-6) / 1e9, 1),
                physical_gbps=round(physical / (med_us * 1e-6) / 1e9, 1), card=card, commit=commit(),
                timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                baseline=baseline, **extra)


def append_jsonl(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
