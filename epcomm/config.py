"""Settings: the frozen Config of the normal kernels, and (re-exported from epcomm/env.py) the one table of EPCOMM_*
environment variables."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from .env import ENV_VARS, EnvVar, env, env_table_markdown  # noqa: F401  (re-exported: the table's public home)
from .errors import ConfigError
from .intranode import nvl_buffer_size_hint


@dataclass(frozen=True)
class Config:
    """Launch settings of the normal (intranode) kernels: DeepEP's Config, positionally and by name, plus epcomm's own
    knobs as keyword-only fields.

    DeepEP's fields (what code written for deep_ep.Config passes; a JSON config with these names works as
    Config(**fields)):
    num_sms: the most SMs one dispatch/combine kernel may occupy (a positive int; the kernels use min(num_sms, SMs)).
    num_max_nvl_chunked_send_tokens, num_max_nvl_chunked_recv_tokens, num_max_rdma_chunked_send_tokens,
        num_max_rdma_chunked_recv_tokens: the chunk sizes of DeepEP's ring queues. epcomm's buffers are fixed
        worst-case areas with direct addressing (no queues), so they change nothing here; they are checked as DeepEP
        checks them (send < recv, rdma send <= rdma recv / 2 after recv is aligned up to a multiple of send).

    epcomm's own (keyword-only):
    num_max_tokens: tokens per rank the buffer is sized for (its worst case), used by size hints.
    num_threads: threads per block of the dispatch / combine kernels (a multiple of 32 in 128..1024; a tuning knob:
        512 keeps every row copy in registers without spills, see bench/NOTES.md).
    send_peer_sms: of the dispatch send kernel's SMs, how many store rows to other ranks while the rest copy the
        rank's own rows beside them (a tuning knob). None: chosen from the rank count and the row type
        (intranode.default_peer_sms);
        0: every SM does both.
    """
    num_sms: int = 20
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256
    _: dataclasses.KW_ONLY
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
        def positive(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"Config.{name}: expected a positive int, got {value!r}")
            return value

        positive("num_sms")
        nvl_send, nvl_recv = positive("num_max_nvl_chunked_send_tokens"), positive("num_max_nvl_chunked_recv_tokens")
        if nvl_send >= nvl_recv:
            raise ConfigError(f"Config.num_max_nvl_chunked_send_tokens: expected less than "
                              f"num_max_nvl_chunked_recv_tokens={nvl_recv} (as DeepEP requires), got {nvl_send}")
        rdma_send, rdma_recv = positive("num_max_rdma_chunked_send_tokens"), positive("num_max_rdma_chunked_recv_tokens")
        # DeepEP aligns the RDMA receive chunk up to a multiple of the send chunk, then needs room for two sends.
        rdma_recv = (rdma_recv + rdma_send - 1) // rdma_send * rdma_send
        object.__setattr__(self, "num_max_rdma_chunked_recv_tokens", rdma_recv)
        if rdma_send > rdma_recv // 2:
            raise ConfigError(f"Config.num_max_rdma_chunked_send_tokens: expected at most half of "
                              f"num_max_rdma_chunked_recv_tokens={rdma_recv} (as DeepEP requires), got {rdma_send}")
        positive("num_max_tokens")
        if not isinstance(self.num_threads, int) or self.num_threads % 32 or not 128 <= self.num_threads <= 1024:
            raise ConfigError(f"Config.num_threads: expected a multiple of 32 in 128..1024, got {self.num_threads!r}")
        if self.send_peer_sms is not None and (not isinstance(self.send_peer_sms, int) or self.send_peer_sms < 0):
            raise ConfigError(f"Config.send_peer_sms: expected None or an int >= 0, got {self.send_peer_sms!r}")

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_json(cls, source) -> "Config":
        """A Config from DeepEP-style JSON: a dict, a JSON text, or the path of a JSON file, holding DeepEP's field
        names (and, optionally, epcomm's keyword-only ones). Unknown names are a ConfigError naming them."""
        import json
        if isinstance(source, (str, os.PathLike)) and not str(source).lstrip().startswith("{"):
            with open(source) as f:
                fields = json.load(f)
        elif isinstance(source, str):
            fields = json.loads(source)
        else:
            fields = dict(source)
        known = {f.name for f in dataclasses.fields(cls) if f.name != "_"}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ConfigError(f"Config: unknown field(s) {unknown}; expected some of {sorted(known)}")
        return cls(**fields)
