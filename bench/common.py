"""Shared benchmark plumbing: the command line, the one byte-accounting function, timing with CUDA events, who runs
(card, ranks, GPUs, oversubscription), DeepEP's normal workload and its calls, the peer-store probe, result records.
Used by the standard benchmarks (bench/bench_*.py) and the experiments (bench/experiments/)."""
from __future__ import annotations

import datetime
import json
import os
import subprocess

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def workload_args(tokens: int, iters: int, quick_iters: int, doc: str | None = None, extra=None):
    """The benchmarks' command line: the workload (--tokens/--hidden/--topk/--experts, DeepEP's shapes by default),
    --iters (--quick: quick_iters) and --out (a folder that also gets the JSON lines); extra(parser) adds a script's
    own options."""
    import argparse
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=tokens)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--iters", type=int, default=iters)
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    ap.add_argument("--out", default=None)
    if extra is not None:
        extra(ap)
    args = ap.parse_args()
    args.iters = quick_iters if args.quick else args.iters
    return args


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


def timed(fn, group, n: int, warmup: int = 3) -> float:
    """Median per-call time (us) of n back-to-back calls of fn: an event on the caller's stream before each call and
    one after the last; call i's time is the gap between its event and the next. Ranks are released together once (a
    barrier) and then keep in step through the calls' own synchronisation, as in a model's layer loop; the GPU never
    idles between calls (idle gaps would let its clocks drop and time the ramp, not the call)."""
    import cupy as cp
    for _ in range(warmup):
        fn()
    cp.cuda.Device().synchronize()
    group.barrier()
    s = cp.cuda.get_current_stream()
    evs = [cp.cuda.Event() for _ in range(n + 1)]
    for i in range(n):
        evs[i].record(s)
        fn()
    evs[n].record(s)
    evs[n].synchronize()
    return median_us([cp.cuda.get_elapsed_time(evs[i], evs[i + 1]) for i in range(n)])


def timed_graph(fn, group, n: int, calls_per_capture: int = 1, check=None) -> float:
    """Median device time (us) per call of fn captured once into a CUDA graph (calls_per_capture calls in it) and
    replayed back-to-back n times: no host work per call (what a graph-captured layer loop sees). fn must need no host
    synchronisation. check(): called after the replays (e.g. the backend's error check)."""
    import cupy as cp
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        fn()  # warm-up: kernels loaded, pool filled
        s.synchronize()
        group.barrier()
        s.begin_capture()
        fn()
        graph = s.end_capture()
        graph.launch(s)
        s.synchronize()
        group.barrier()
        evs = [cp.cuda.Event() for _ in range(n + 1)]
        for i in range(n):
            evs[i].record(s)
            graph.launch(s)
        evs[n].record(s)
        evs[n].synchronize()
    if check is not None:
        check()
    return median_us([cp.cuda.get_elapsed_time(evs[i], evs[i + 1]) for i in range(n)]) / calls_per_capture


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
    """One JSON line. More ranks than GPUs adds "oversubscribed": true (ranks time-slice a GPU: not NVLink timings;
    bench/plot.py leaves such records out of the history)."""
    if ranks > gpus:
        extra["oversubscribed"] = True
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


def save_records(name: str, rows: list[dict], out: str | None) -> None:
    """Append rows to bench/results/<name>.jsonl (the history README's tables come from) and to <out>/<name>.jsonl."""
    append_jsonl(os.path.join(RESULTS, f"{name}.jsonl"), rows)
    if out:
        append_jsonl(os.path.join(out, f"{name}.jsonl"), rows)


class Ranks:
    """Who runs a benchmark, from an epcomm Group: rank, num_ranks, card (the GPU's name), num_sms (its SM count),
    gpus (distinct GPUs of all ranks), oversubscribed (more ranks than GPUs: ranks time-slice one GPU and a "peer"
    copy stays on it, so timings are not NVLink timings); plus timing that keeps the ranks in step."""

    def __init__(self, group):
        import cupy as cp
        self.group = group
        self.rank, self.num_ranks = group.rank, group.size
        topo = group.topology
        self.gpus = len(set(zip(topo.host_of_rank, topo.device_of_rank)))
        self.oversubscribed = self.num_ranks > self.gpus
        self.card = cp.cuda.runtime.getDeviceProperties(group.device)["name"].decode()
        self.num_sms = cp.cuda.Device(group.device).attributes["MultiProcessorCount"]

    @property
    def measures_links(self) -> bool:
        """Two or more ranks, one GPU each: peer copies cross NVLink, and NCCL (one GPU per rank) can run."""
        return self.num_ranks >= 2 and not self.oversubscribed

    def log(self, *a) -> None:
        if self.rank == 0:
            print(*a, flush=True)

    def agree(self, v):
        """The largest value over the ranks: a call's time is its slowest rank's, a row count the busiest rank's."""
        return max(self.group.allgather(v))

    def timed(self, fn, n: int, warmup: int = 3) -> float:
        return timed(fn, self.group, n, warmup)

    def timed_graph(self, fn, n: int, calls_per_capture: int = 1, check=None) -> float:
        return timed_graph(fn, self.group, n, calls_per_capture, check)

    def title(self) -> str:
        """e.g. "NVIDIA H200 x2, EP2" or "NVIDIA H100 x1, EP4 (oversubscribed: 4 ranks share 1 GPU)"."""
        over = f" (oversubscribed: {self.num_ranks} ranks share {self.gpus} GPU{'s' if self.gpus > 1 else ''})"
        return f"{self.card} x{self.gpus}, EP{self.num_ranks}{over if self.oversubscribed else ''}"

    def say_limits(self, needs_peer: str) -> None:
        """Print (rank 0) what this shape of run cannot measure: needs_peer names what is skipped without links."""
        if self.num_ranks == 1:
            self.log(f"EP1 (one rank, no peer): {needs_peer} skipped (they need a peer on another GPU); every rank's "
                     "rows are its own, so physical bytes are 0 and the times are of the local path")
        elif self.oversubscribed:
            self.log(f"oversubscribed: {self.num_ranks} ranks share {self.gpus} GPU(s), so timings are NOT NVLink "
                     f"timings (ranks time-slice a GPU; their peer copies stay on it); {needs_peer} skipped; records "
                     "are marked \"oversubscribed\": true")


# -- the one-way peer-store ceiling (and the link probes of bench/experiments/link_probes.py) ---------------------
_COPY16_SRC = r"""
extern "C" __global__ void copy16(const int4* __restrict__ s, int4* __restrict__ d, size_t n) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x, st = (size_t)gridDim.x * blockDim.x;
  for (; i < n; i += st) d[i] = s[i];
}"""
_copy16 = None


def peer_store_gbps(ranks: Ranks, src, dst_ptr: int, nbytes: int, blocks: int, active: bool, n: int = 10) -> float:
    """GB/s of nbytes of 16-byte stores from src (a device array) to dst_ptr (a peer's buffer) by `blocks` blocks x
    512 threads, one store per thread per step, on the ranks where active (the others idle): the slowest active
    rank's median of n calls."""
    import cupy as cp
    global _copy16
    if _copy16 is None:
        _copy16 = cp.RawKernel(_COPY16_SRC, "copy16")

    def run():
        if active:
            _copy16((blocks,), (512,), (src, cp.uint64(dst_ptr), cp.uint64(nbytes // 16)))
    t = ranks.timed(run, n)
    return nbytes / (ranks.agree(t if active else 0) * 1e-6) / 1e9


# -- DeepEP's normal workload ------------------------------------------------------------------------------------
class IntranodeWorkload:
    """DeepEP's normal workload at one rank (T tokens, hidden H, top-K of E experts, uniform routing; inputs from
    per-rank seeds, the same in every run) and the calls the intranode benchmark and experiments time, on the Buffer
    last given to bind().

    x_bf16 [T, H] bf16; fp8 = (x_fp8 [T, H] e4m3 bits as uint8, scales_cm [T, H/128] float32, column-major);
    idx [T, K] int64; w [T, K] float32. After bind(buf): per_rank, per_expert, in_rank (the layout), handle (of an
    FP8 dispatch: every cached call and combine reuses it), recv_bf16 [N, H] (a BF16 dispatch's rows: combine's
    input)."""

    def __init__(self, tokens: int, hidden: int, topk: int, experts: int, rank: int):
        import cupy as cp

        from epcomm import reference as ref
        from epcomm.testing import make_topk
        self.T, self.H, self.K, self.E = tokens, hidden, topk, experts
        rng = np.random.default_rng(1234 + rank)
        x_host = rng.standard_normal((tokens, hidden), dtype=np.float32).astype(ref.bf16)
        fp8_host, scales_host = ref.per_token_cast_to_fp8(x_host)
        self.x_bf16 = cp.asarray(x_host)
        self.x_fp8 = cp.asarray(fp8_host.view(np.uint8))  # CuPy has no float8 dtype: the e4m3 bits
        scales = cp.asarray(scales_host)
        self.scales_cm = cp.asarray(scales.T.copy()).T  # column-major, as DeepGEMM-style callers hold them
        self.fp8 = (self.x_fp8, self.scales_cm)
        self.idx = cp.asarray(make_topk(np.random.default_rng(99 + rank), tokens, topk, experts))
        self.w = cp.asarray(np.random.default_rng(7 + rank).random((tokens, topk), dtype=np.float32))
        self.buf = None

    def nvl_bytes(self, num_ranks: int) -> int:
        """The Buffer's num_nvl_bytes: room for zero-copy outputs and combine's staging rows at once."""
        from epcomm.intranode import nvl_buffer_size_hint
        return nvl_buffer_size_hint(self.T, self.H * 2, num_ranks, self.K, zero_copy=True)

    def bind(self, buf) -> None:
        """Time buf's calls from now on: its layout, a first FP8 dispatch (the handle) and a BF16 one (recv_bf16)."""
        self.buf = buf
        self.per_rank, _, self.per_expert, self.in_rank, _ = buf.get_dispatch_layout(self.idx, self.E)
        self.handle = self.dispatch(self.fp8)[4]
        self.recv_bf16 = self.dispatch(self.x_bf16)[0]

    def received_rows(self) -> tuple[int, int]:
        """(rows this rank received, of them its own) in the bound handle."""
        h = self.handle
        n_local = int(h.num_recv_tokens_per_source[self.buf.rank].get()) \
            if hasattr(h.num_recv_tokens_per_source, "get") else 0
        return h.num_recv_tokens, n_local

    def layout(self):
        return self.buf.get_dispatch_layout(self.idx, self.E)

    def dispatch(self, x, config=None, zero_copy=False):
        """A full dispatch (notify, host wait for the counts, send, receive) of x: x_bf16 or fp8."""
        return self.buf.dispatch(x, num_tokens_per_rank=self.per_rank, is_token_in_rank=self.in_rank,
                                 num_tokens_per_expert=self.per_expert, topk_idx=self.idx, topk_weights=self.w,
                                 config=config, zero_copy=zero_copy)

    def cached(self, x, config=None, zero_copy=False):
        """A cached dispatch of x with the bound handle (no host wait: CUDA-graph capturable)."""
        return self.buf.dispatch(x, handle=self.handle, config=config, zero_copy=zero_copy)

    def combine(self, config=None):
        return self.buf.combine(self.recv_bf16, self.handle, config=config)

    def zero_copy_combine(self, config=None):
        """Reads the rows written into get_combine_buffer (no staging copy): fill_combine_buffer() first."""
        return self.buf.combine(None, self.handle, config=config, zero_copy=True)

    def fill_combine_buffer(self, config=None) -> None:
        """A zero-copy cached BF16 dispatch, then recv_bf16 written into get_combine_buffer (a zero-copy combine's
        input)."""
        import cupy as cp
        self.cached(self.x_bf16, config, zero_copy=True)
        cbuf = self.buf.get_combine_buffer(self.handle)
        cbuf.view(cp.uint16)[...] = self.recv_bf16.view(cp.uint16)


class LowLatencyWorkload:
    """DeepEP's low-latency workload at one rank (T tokens, hidden H, top-K of E experts; inputs from per-rank seeds)
    and the calls the low-latency benchmark and experiments time, on the Buffer last given to bind().

    x [T, H] bf16; idx_host / idx [T, K] int64 (host / device); w [T, K] float32; y [E/R, R*T, H] bf16 (the experts'
    outputs: any values, combine reads only the rows the dispatch filled). After bind(buf): handle (of an FP8
    dispatch, what combine uses)."""

    def __init__(self, tokens: int, hidden: int, topk: int, experts: int, rank: int, num_ranks: int):
        import cupy as cp

        from epcomm import reference as ref
        from epcomm.testing import make_topk
        self.T, self.H, self.K, self.E = tokens, hidden, topk, experts
        self.e_local = experts // num_ranks
        rng = np.random.default_rng(1234 + rank)
        self.x = cp.asarray(rng.standard_normal((tokens, hidden), dtype=np.float32).astype(ref.bf16))
        self.idx_host = make_topk(np.random.default_rng(99 + rank), tokens, topk, experts)
        self.idx = cp.asarray(self.idx_host)
        self.w = cp.asarray(np.random.default_rng(7 + rank).random((tokens, topk), dtype=np.float32))
        self.y = cp.asarray(rng.standard_normal((self.e_local, num_ranks * tokens, hidden),
                                                dtype=np.float32).astype(ref.bf16))
        self.buf = None

    def rdma_bytes(self, num_ranks: int) -> int:
        import epcomm
        return epcomm.Buffer.get_low_latency_rdma_size_hint(self.T, self.H, num_ranks, self.E)

    def bind(self, buf) -> None:
        """Time buf's calls from now on; a first FP8 dispatch gives the handle combine uses."""
        self.buf = buf
        self.handle = self.dispatch_fp8()[2]

    def dispatch_fp8(self, return_recv_hook=False):
        return self.buf.low_latency_dispatch(self.x, self.idx, self.T, self.E, use_fp8=True,
                                             return_recv_hook=return_recv_hook)

    def combine_bf16(self, handle=None, return_recv_hook=False):
        handle = handle if handle is not None else self.handle
        return self.buf.low_latency_combine(self.y, self.idx, self.w, handle, return_recv_hook=return_recv_hook)

    # Graphs must hold an even number of calls of each kind, or dispatch / combine pairs, so that replays alternate
    # the buffer halves (see epcomm.gpu.low_latency.LowLatencyGpu).
    def two_dispatches(self) -> None:
        self.dispatch_fp8()
        self.dispatch_fp8()

    def two_combines(self) -> None:
        self.combine_bf16()
        self.combine_bf16()

    def pair(self) -> None:
        self.combine_bf16(self.dispatch_fp8()[2])
