"""LogFMT-10 error and bytes on DeepEP's test_low_latency shapes (CPU, the numpy reference): calc_diff of one rank's
low-latency combine against the fp32 reference x * sum(weights), bf16 rows vs LogFMT rows, bf16 or FP8 dispatch.
Run: PYTHONPATH=. python bench/logfmt_error.py  (prints a markdown table; docs/api.md quotes it)."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_logfmt import deepep_combine_diff, deepep_inputs  # noqa: E402

from epcomm import reference as ref  # noqa: E402

BF16 = ref.bf16


def main() -> None:
    tokens, hidden, topk, experts, ranks = 128, 7168, 8, 288, 8
    rng, idx, w = deepep_inputs(0, tokens, hidden, topk, experts)
    py = random.Random(1)
    inputs = [("DeepEP x of rank 3: 3 - 128, last 128 channels = token index", None)]
    inputs += [(f"randn * 0.5 * {u:.3f}", 0.5 * u) for u in (py.random() for _ in range(4))]
    inputs += [("randn * 0.1 (DeepEP's perf case)", 0.1)]
    print("| input | dispatch | calc_diff bf16 rows | calc_diff LogFMT | chunks cast | bytes/row LogFMT (bf16: "
          f"{hidden * 2}) |")
    print("|---|---|---|---|---|---|")
    for name, scale in inputs:
        if scale is None:
            x = np.full((tokens, hidden), 3 - 128, np.float32)
            x[:, -128:] = np.arange(tokens)[:, None]
        else:
            x = rng.standard_normal((tokens, hidden)).astype(np.float32) * np.float32(scale)
        x = x.astype(BF16)
        enc = ref.logfmt_encode(x)
        chunk = ref.logfmt_chunk_size(hidden)
        raw_bytes = hidden // 128 * 4 + hidden * 2
        cast_frac = (raw_bytes - enc.num_bytes).sum() / ((chunk * 2 - chunk * 10 // 8) * (hidden // chunk) * tokens)
        for fp8 in (False, True):
            plain = deepep_combine_diff(x, idx, w, ranks, experts, False, fp8)
            logfmt = deepep_combine_diff(x, idx, w, ranks, experts, True, fp8)
            print(f"| {name} | {'FP8' if fp8 else 'bf16'} | {plain:.3g} | {logfmt:.3g} | {cast_frac:.0%} | "
                  f"{enc.num_bytes.mean():.0f} |")


if __name__ == "__main__":
    main()
