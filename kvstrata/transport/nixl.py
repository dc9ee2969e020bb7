"""The nixl transport (``kvs+nixl://``): chunk bytes move with NIXL READ/WRITE (UCX backend).

The server runs one long-lived NIXL agent that registers its host pool and a few staging slots. A client
connects over the usual kvs control connection (HELLO, auth), then sends ``NIXL_ATTACH`` with its agent's
metadata and receives the server agent's (both sides load the other's, so UCX can wire up either way).
Gets and puts then follow :mod:`kvstrata.transport.lease`: the server pins a chunk and returns its address,
the client READs it straight into the destination tensor (registered for the transfer) and releases the
lease; a put is WRITTEN straight into a slot reserved in the host pool and committed there (a staging
slot and one server-side copy only when no pool slot can be reserved). On a CPU-only machine UCX moves the
bytes with TCP and cross-memory attach (DRAM to DRAM); with RDMA NICs and GPU memory the same code path uses
them.

Opcodes (see ``docs/protocol.md``, "nixl"): ``0x50`` NIXL_ATTACH, ``0x51`` LEASE_GET, ``0x52`` RELEASE,
``0x53`` PUT_BEGIN, ``0x54`` PUT_COMMIT.

NIXL is an optional dependency (``pip install kvstrata[nixl]``) imported on first use. Agents are created
once per process and kept for its lifetime: creating and destroying UCX agents repeatedly is slow, and
NIXL's library teardown at interpreter exit has been seen to crash, so long-lived processes are assumed.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Sequence
from typing import Annotated, Any

import msgspec
import torch

from kvstrata.errors import ConfigError, ConnectError, ProtocolError, RequestTimeoutError
from kvstrata.transport import lease as ls
from kvstrata.transport import protocol as p

__all__ = [
    "NIXL_BASE",
    "STAGING_SLOTS",
    "NixlAttachReply",
    "NixlAttachRequest",
    "NixlTransport",
    "new_agent",
]

log = logging.getLogger(__name__)

NIXL_BASE = 0x50
#: Staging slots registered beside the host pool (puts, and gets of chunks held outside the host pool).
STAGING_SLOTS = 32
#: Bound on an agent's metadata blob (a few hundred bytes with UCX over TCP; more with many NICs).
MAX_AGENT_METADATA = 256 * 1024

AgentMetadata = Annotated[bytes, msgspec.Meta(max_length=MAX_AGENT_METADATA)]


class NixlAttachRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """NIXL_ATTACH: the client agent's metadata."""

    agent: AgentMetadata


class NixlAttachReply(msgspec.Struct, kw_only=True, omit_defaults=True):
    """NIXL_ATTACH reply: the server agent's metadata (with its registered memory)."""

    agent: AgentMetadata


p.register_meta(NIXL_BASE + ls.ATTACH, NixlAttachRequest, NixlAttachReply)
ls.register_lease_ops(NIXL_BASE)


def _import_nixl() -> tuple[Any, Any]:
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except Exception as exc:  # ImportError, or a broken native library
        raise ConfigError(
            f"the nixl transport needs the 'nixl' package (pip install kvstrata[nixl]): {exc}"
        ) from exc
    return nixl_agent, nixl_agent_config


#: Microseconds the agent's progress thread sleeps between polls. NIXL's Python wrapper fixes it at 0, a
#: thread spinning a whole core for as long as the agent lives (an idle server included).
PROGRESS_DELAY_US = 100
_agent_lock = threading.Lock()


def new_agent(role: str) -> Any:
    nixl_agent, nixl_agent_config = _import_nixl()
    name = f"kvstrata-{role}-{os.getpid()}-{secrets.token_hex(6)}"
    try:
        import nixl._api as api

        bindings = api.nixlBind
        base = bindings.nixlAgentConfig
    except Exception:  # a layout this does not know: NIXL's own defaults
        bindings = base = None
    with _agent_lock:
        if bindings is not None:
            bindings.nixlAgentConfig = _paced_config(base)
        try:
            return nixl_agent(name, nixl_agent_config(backends=["UCX"]))
        except Exception as exc:
            raise ConfigError(f"cannot create a NIXL agent with the UCX backend: {exc}") from exc
        finally:
            if bindings is not None:
                bindings.nixlAgentConfig = base


def _paced_config(base: Any) -> Any:
    """A subclass of NIXL's agent config whose progress-thread delay is at least ``PROGRESS_DELAY_US``."""

    class PacedConfig(base):  # type: ignore[misc, valid-type]
        @property
        def pthrDelay(self) -> int:  # NIXL's attribute name
            return int(base.pthrDelay.__get__(self))

        @pthrDelay.setter
        def pthrDelay(self, value: int) -> None:
            base.pthrDelay.__set__(self, max(int(value), PROGRESS_DELAY_US))

    return PacedConfig


class _ClientAgent:
    """The process-wide client agent: created on first use, shared by every nixl transport, never freed."""

    _lock = threading.Lock()
    _agent: Any = None
    #: server agents whose metadata the client agent has loaded
    _known: set[str] = set()

    @classmethod
    def get(cls) -> Any:
        with cls._lock:
            if cls._agent is None:
                cls._agent = new_agent("client")
            return cls._agent


class NixlTransport(ls.LeaseTransport):
    """``kvs+nixl://host:port``: the kvs control connection plus NIXL READ/WRITE of chunk bytes."""

    scheme = "kvs+nixl"
    name = "nixl"
    base = NIXL_BASE

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.agent: Any = None
        self.peer: str | None = None

    def _attach(self) -> None:
        agent = _ClientAgent.get()
        op = NIXL_BASE + ls.ATTACH
        rid = self._request(op, NixlAttachRequest(agent=agent.get_agent_metadata()))
        _, reply = self._reply(rid, op)
        with _ClientAgent._lock:
            try:
                peer = agent.add_remote_agent(reply.agent)
            except Exception as exc:
                raise ProtocolError(f"{self.address}: unusable NIXL agent metadata: {exc}") from exc
            _ClientAgent._known.add(peer)
        self.agent = agent
        self.peer = peer.decode() if isinstance(peer, bytes) else peer

    def _transfer(self, op: str, spans: Sequence[tuple[int, torch.Tensor]]) -> None:
        """One NIXL request moving every span (local tensors registered for its duration)."""
        spans = [(pos, t) for pos, t in spans if t.numel()]
        if not spans:
            return
        agent = self.agent
        if agent is None or self.peer is None:
            raise ConnectError(f"{self.address}: not attached")
        tensors = [t for _, t in spans]
        with _ClientAgent._lock:
            try:
                reg = agent.register_memory(tensors)
            except Exception as exc:
                raise ConnectError(f"{self.address}: NIXL memory registration failed: {exc}") from exc
            try:
                local = agent.get_xfer_descs(tensors)
                remote = agent.get_xfer_descs([(pos, t.numel(), 0) for pos, t in spans], "DRAM")
                handle = agent.initialize_xfer(op, local, remote, self.peer)
                try:
                    state = agent.transfer(handle)
                    while state == "PROC":
                        if time.monotonic() >= self._deadline:
                            raise RequestTimeoutError(f"{self.address}: NIXL {op} did not finish in time")
                        state = agent.check_xfer_state(handle)
                    if state != "DONE":
                        raise ConnectError(f"{self.address}: NIXL {op} failed ({state})")
                finally:
                    try:
                        agent.release_xfer_handle(handle)
                    except Exception as exc:
                        log.debug("nixl: releasing a transfer: %s", exc)
            except (ConnectError, RequestTimeoutError):
                raise
            except Exception as exc:
                raise ConnectError(f"{self.address}: NIXL {op} failed: {exc}") from exc
            finally:
                try:
                    agent.deregister_memory(reg)
                except Exception as exc:
                    log.debug("nixl: deregistering: %s", exc)

    def _read_many(self, spans: Sequence[tuple[int, torch.Tensor]]) -> None:
        self._transfer("READ", spans)

    def _write_many(self, spans: Sequence[tuple[int, torch.Tensor]]) -> None:
        self._transfer("WRITE", spans)
