"""DeepEP callers on the GPU backend: tests/torchrun/dropin_check.py's cases with CUDA tensors (vLLM, SGLang,
Megatron-Core and torchtitan call sequences over a torch.distributed gloo group, DeepEP's API surface, the FP8 cases:
the low-latency cast bit-exact with NaN / inf inputs and normal-mode scale bits with NaN payloads, the get_buffer loop
and create/destroy cycles with flat Buffer / Group / fd / store-key counts and GPU memory), plus GPU-only cases:
DeepEP's transport switches and low-latency Buffers made again (NVSHMEM finalised and started again in one process).

One GPU with several ranks sharing it works (rank i uses GPU LOCAL_RANK % visible GPUs):
    torchrun --nproc-per-node 2 tests/gpu/dropin_check.py [--cycles N] [--steps N] [--quick]
    mpirun -n 2 python tests/gpu/dropin_check.py          (torch.distributed started from the MPI ranks)
Prints 'N passed, M failed, K skipped'; exit 1 if any case failed. --cycles defaults to 10000 (each cycle makes a
GPU Buffer: CUDA IPC, a barrier; the per-cycle time is printed, untimed on a GPU so far); --quick runs 100 cycles and
200 get_buffer steps.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "torchrun"))  # first: its dropin_check, not this file of the same name

import numpy as np  # noqa: E402
import torch  # noqa: E402

import dropin_check as common  # noqa: E402  (tests/torchrun/dropin_check.py)
import epcomm  # noqa: E402
from epcomm import reference as ref  # noqa: E402
from epcomm.testing import make_rank_inputs  # noqa: E402


def case_transport_switches(w):
    """use_fabric is refused; allow_mnnvl needs fabric-handle support; allow_nvlink_for_low_latency_mode=False sends
    every peer NVSHMEM puts (force_nvshmem) and gives the same results."""
    R, rank = w.R, w.rank
    try:
        epcomm.Buffer(w.world, 1 << 22, use_fabric=True)
        raise AssertionError("use_fabric=True must be a ConfigError")
    except epcomm.ConfigError as exc:
        common.check("use_fabric" in str(exc), str(exc))
    from epcomm.buffer import _fabric_supported
    fabric = _fabric_supported(torch.cuda.current_device())
    try:
        epcomm.Buffer(w.world, 1 << 22, allow_mnnvl=True).destroy()
        common.check(fabric, "allow_mnnvl=True was accepted on a GPU without fabric-handle support")
    except epcomm.ConfigError as exc:
        common.check(not fabric and "allow_mnnvl" in str(exc), str(exc))
    TMAX, H, K, E = 16, 256, 4, 4 * R
    xs, idxs, ws = make_rank_inputs(w.next_seed(), [TMAX] * R, H, K, E)
    buf = epcomm.Buffer(w.world, 0, epcomm.Buffer.get_low_latency_rdma_size_hint(TMAX, H, R, E),
                        low_latency_mode=True, num_qps_per_rank=E // R, allow_nvlink_for_low_latency_mode=False)
    try:
        common.check(buf.tuning("low_latency").force_nvshmem, "allow_nvlink_for_low_latency_mode=False: NVSHMEM puts")
        recv, count, handle, _, _ = buf.low_latency_dispatch(w.t(xs[rank]), w.t(idxs[rank]), TMAX, E, use_fp8=False)
        res = ref.low_latency_dispatch(xs, idxs, TMAX, E, use_fp8=False)
        common.check(common.n(count).tolist() == res[rank].recv_count.tolist(), "recv_count over NVSHMEM puts")
        out, _, _ = buf.low_latency_combine(recv, w.t(idxs[rank]), w.t(ws[rank]), handle)
        want = ref.low_latency_combine([r.recv_x for r in res], idxs, ws, res, E)[rank]
        common.close_enough(common.n(out), want, "combine over NVSHMEM puts")
    finally:
        buf.destroy()


def case_low_latency_again(w, rounds=3):
    """A low-latency Buffer made, used and destroyed `rounds` times (each destroy finalises NVSHMEM when the Buffer
    made its group, each new Buffer starts it again, as DeepEP's do)."""
    R, rank = w.R, w.rank
    TMAX, H, K, E = 8, 128, 2, 2 * R
    for i in range(rounds):
        xs, idxs, ws = make_rank_inputs(w.next_seed(), [TMAX] * R, H, K, E)
        buf = epcomm.Buffer(w.world, 0, epcomm.Buffer.get_low_latency_rdma_size_hint(TMAX, H, R, E),
                            low_latency_mode=True, num_qps_per_rank=E // R)
        try:
            recv, count, handle, _, _ = buf.low_latency_dispatch(w.t(xs[rank]), w.t(idxs[rank]), TMAX, E,
                                                                 use_fp8=False)
            res = ref.low_latency_dispatch(xs, idxs, TMAX, E, use_fp8=False)
            common.check(common.n(count).tolist() == res[rank].recv_count.tolist(), f"round {i}: recv_count")
            out, _, _ = buf.low_latency_combine(recv, w.t(idxs[rank]), w.t(ws[rank]), handle)
            want = ref.low_latency_combine([r.recv_x for r in res], idxs, ws, res, E)[rank]
            common.close_enough(common.n(out), want, f"round {i}: combine")
        finally:
            buf.destroy()


def gpu_cases(cases, w):
    cases.run("GPU transport switches", case_transport_switches, w)
    cases.run("low-latency Buffer made again x3", case_low_latency_again, w)


if __name__ == "__main__":
    args = common.parse_args(["--device", "cuda"] + sys.argv[1:])
    if not torch.cuda.is_available():
        print("dropin_check (GPU): torch sees no CUDA device")
        print("0 passed, 1 failed, 0 skipped")
        sys.exit(1)
    np.seterr(all="ignore")
    sys.exit(common.run(args, extra_cases=[gpu_cases]))
