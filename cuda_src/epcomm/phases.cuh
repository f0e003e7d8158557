// Phase ids of bounded waits: which step of which operation a timed-out wait belonged to (ErrorRecord::phase).
// NOTES: mirrored by PHASE_NAMES in epcomm/runtime/watchdog.py (kLlDispatchRecv <-> "ll_dispatch_recv"); a parity test
// in tests/test_runtime.py parses this file. Keep one `constexpr int kName = id;` per line; never reuse an id.
#pragma once

namespace epcomm::phase {

constexpr int kUnknown = 0;         // the kernel did not say
constexpr int kNotify = 1;          // intranode notify: waiting for a peer's token counts
constexpr int kDispatch = 2;        // intranode dispatch, receiver: waiting for a sender's tail
constexpr int kDispatchSend = 3;    // intranode dispatch, sender: waiting for space in a receiver's queue
constexpr int kCombine = 4;         // intranode combine, receiver: waiting for a sender's tail
constexpr int kCombineSend = 5;     // intranode combine, sender: waiting for space in a receiver's queue
constexpr int kBarrier = 6;         // barrier among the ranks of a buffer
constexpr int kLlDispatchRecv = 7;  // low-latency dispatch: waiting for a source rank's count / signal
constexpr int kLlCombineRecv = 8;   // low-latency combine: waiting for an expert owner's signal
constexpr int kProbe = 9;           // bootstrap probe kernels (epcomm/probe.py)
constexpr int kLlCombineSend = 10;  // low-latency combine, expert side: waiting for a token owner's top-k weights

}  // namespace epcomm::phase
