// Phase ids of bounded waits: which step of which operation a timed-out wait belonged to (ErrorRecord::phase).
// NOTES: mirrored by PHASE_NAMES in epcomm/runtime/watchdog.py (kLlDispatchRecv <-> "ll_dispatch_recv"); a parity test
// in tests/test_runtime.py parses this file. Keep one `constexpr int kName = id;` per line; never reuse an id (a retired
// phase keeps its line, so old error records still decode).
#pragma once

namespace epcomm::phase {

constexpr int kUnknown = 0;         // the kernel did not say
constexpr int kNotify = 1;          // intranode notify (or a cached dispatch's barrier): waiting for a peer's counts flag
constexpr int kDispatch = 2;        // intranode dispatch: waiting for a source's done flag (all its rows are here)
constexpr int kDispatchSend = 3;    // retired (the queue-based dispatch's sender waiting for space)
constexpr int kCombine = 4;         // intranode combine: waiting for a peer's ready flag (stage) or staged rows (reduce)
constexpr int kCombineSend = 5;     // retired (the queue-based combine's sender waiting for space)
constexpr int kBarrier = 6;         // retired (no kernel waits in a barrier of its own)
constexpr int kLlDispatchRecv = 7;  // low-latency dispatch: waiting for a source rank's count / signal
constexpr int kLlCombineRecv = 8;   // low-latency combine: waiting for an expert owner's signal
constexpr int kProbe = 9;           // bootstrap probe kernels (epcomm/probe.py)
constexpr int kLlCombineSend = 10;  // low-latency combine, expert side: waiting for a token owner's top-k weights

}  // namespace epcomm::phase
