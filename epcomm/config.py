"""Settings: the frozen Config of the normal kernels, and (re-exported from epcomm/env.py) the one table of EPCOMM_*
environment variables."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .env import ENV_VARS, EnvVar, env, env_table_markdown  # noqa: F401  (re-exported: the table's public home)
from .errors import ConfigError
from .intranode import nvl_buffer_size_hint


@dataclass(frozen=True)
class Config:
    """Launch settings of the normal (intranode) kernels.

    num_sms: the most SMs one dispatch/combine kernel may occupy (a positive int; the kernels use min(num_sms, SMs)).
    num_max_tokens: tokens per rank the buffer is sized for (its worst case), used by size hints.
    num_threads: threads per block of the dispatch / combine kernels (a multiple of 32 in 128..1024; a tuning knob:
        512 keeps every row copy in registers without spills, see bench/NOTES.md).
    send_peer_sms: of the dispatch send kernel's SMs, how many store rows to other ranks while the rest copy the
        rank's own rows beside them (a tuning knob). None: chosen from the rank count and the row type
        (intranode.default_peer_sms);
        0: every SM does both.
    """
    num_sms: int = 24
    num_max_tokens: int = 4096
    num_threads: int = 512
    send_peer_sms: int | None = None

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int, zero_copy: bool = False) -> int:
        """Bytes of NVLink buffer for num_max_tokens tokens per rank of hidden_bytes per row (DeepEP's name);
        zero_copy: also room for zero-copy dispatch outputs to stay in the buffer through the combine."""
        return nvl_buffer_size_hint(self.num_max_tokens, int(hidden_bytes), int(num_ranks), zero_copy=bool(zero_copy))

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of RDMA buffer the normal kernels need: 0 (epcomm's normal kernels are intranode only so far)."""
        return 0

    def __post_init__(self):
        if not isinstance(self.num_sms, int) or self.num_sms < 1:
            raise ConfigError(f"Config.num_sms: expected a positive int, got {self.num_sms!r}")
        if not isinstance(self.num_max_tokens, int) or self.num_max_tokens < 1:
            raise ConfigError(f"Config.num_max_tokens: expected a positive int, got {self.num_max_tokens!r}")
        if not isinstance(self.num_threads, int) or self.num_threads % 32 or not 128 <= self.num_threads <= 1024:
            raise ConfigError(f"Config.num_threads: expected a multiple of 32 in 128..1024, got {self.num_threads!r}")
        if self.send_peer_sms is not None and (not isinstance(self.send_peer_sms, int) or self.send_peer_sms < 0):
            raise ConfigError(f"Config.send_peer_sms: expected None or an int >= 0, got {self.send_peer_sms!r}")

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)
