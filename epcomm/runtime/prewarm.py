"""Compile every registered kernel for this machine's GPU (or --arch) into the disk cache, in parallel.

`python -m epcomm.runtime.prewarm` before starting many ranks, so that first use costs no NVRTC time."""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import sys
import time


def _compile(args):
    spec, arch = args
    from .compiler import compile_to_cubin
    t0 = time.perf_counter()
    compile_to_cubin(spec, arch)
    return spec.entry_name, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default=None, help="e.g. sm_90a (default: the current GPU's)")
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--debug-variants", action="store_true",
                   help="also the example specs with diagnostics switches on (EPCOMM_DEBUG_*), which CI compiles")
    args = p.parse_args(argv)
    from .compiler import arch_from_compute_capability
    from .registry import all_example_specs
    arch = args.arch
    if arch is None:
        import cupy
        arch = arch_from_compute_capability(cupy.cuda.Device().compute_capability)
    specs = [s for s in all_example_specs() if args.debug_variants or not s.defines]
    t0 = time.perf_counter()
    failed = 0
    with cf.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futs = {pool.submit(_compile, (s, arch)): s for s in specs}
        for i, fut in enumerate(cf.as_completed(futs), 1):
            try:
                name, dt = fut.result()
                print(f"[{i}/{len(specs)}] {name} ({arch}) {dt:.1f} s", flush=True)
            except Exception as exc:  # report every failure, then fail
                failed += 1
                print(f"[{i}/{len(specs)}] FAILED {futs[fut].entry_name}: {exc}", flush=True)
    print(f"{len(specs) - failed} passed, {failed} failed ({time.perf_counter() - t0:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
