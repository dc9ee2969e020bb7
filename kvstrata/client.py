"""The Python client of kvstrata cache servers: :class:`Client` (blocking) and :class:`AsyncClient`.

::

    from kvstrata import Client

    with Client("kvs://127.0.0.1:7470") as client:
        client.put(key, tensor)                 # key: 16-byte digest or ChunkKey; tensor: contiguous
        chunk = client.get(key)                 # a 1-D uint8 tensor, or None (a miss, and only a miss)
        client.get(key, out=dest)               # fills dest; returns a view of it

Keys are spread over several servers by rendezvous hashing (``Client([url1, url2])``). Each server has a
small pool of connections; a connection that fails is dropped and the call is retried once on a fresh
one (so a restarted server is picked up at once); a server that cannot be reached is marked down and
retried with exponential back-off (``retry_backoff_s``, doubling up to ``max_backoff``, 30 s). While a
server is down, with several servers its keys go to the next server in rendezvous order, from the call
that finds it unreachable on (so a chunk put while its owner was down is found where it was put); a server
that times out is skipped by gets, exists and deletes (misses) and raises from puts. With a single server,
or once every server is down, the call raises :class:`ConnectError`. ``stats()`` and ``ping()`` report a
server that does not answer beside the others (see :meth:`Client.stats`).

Every call takes an optional ``timeout`` (seconds; default: the client's). Errors are those of
:mod:`kvstrata.errors`; OS errors are translated with ``raise ... from exc``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, overload

import torch

from kvstrata.config import ClientConfig
from kvstrata.core.buffers import BufferLike, as_byte_tensor
from kvstrata.core.chunk import EMPTY_META, ChunkMeta, PrefixResult, check_key
from kvstrata.core.keys import ChunkKey
from kvstrata.errors import (
    ConnectError,
    InvalidArgumentError,
    KVStrataError,
    RequestTimeoutError,
)
from kvstrata.transport.base import (
    PutSpec,
    ServerAddress,
    Transport,
    TransportOptions,
    parse_url,
    transport_class,
)

__all__ = ["AsyncClient", "Client", "KeyLike"]

log = logging.getLogger(__name__)

#: A chunk key: a 16-byte digest, or a :class:`kvstrata.core.keys.ChunkKey`.
KeyLike = Any


def _is_single_key(keys: object) -> bool:
    """A lone key (16 bytes or a ChunkKey) rather than a list of them."""
    return isinstance(keys, (bytes, bytearray, memoryview, ChunkKey))


T = TypeVar("T")
_MAX_BACKOFF_S = 30.0


def _key_and_meta(key: KeyLike, meta: ChunkMeta | None) -> tuple[bytes, ChunkMeta]:
    digest = check_key(key)
    if meta is None:
        blocks = getattr(key, "block_keys", None)
        meta = ChunkMeta(block_keys=tuple(blocks)) if blocks else EMPTY_META
    return digest, meta


def _error_entry(exc: KVStrataError) -> dict[str, str]:
    """What :meth:`Client.stats` reports for a server that did not answer."""
    return {"type": type(exc).__name__, "message": str(exc)}


def _host_bytes(data: BufferLike) -> torch.Tensor:
    flat = as_byte_tensor(data)
    return flat if flat.is_cpu else flat.cpu()


def _out_bytes(out: BufferLike | None) -> torch.Tensor | None:
    if out is None:
        return None
    flat = as_byte_tensor(out)
    if not flat.is_cpu:
        raise InvalidArgumentError("out must be in host memory for the tcp transport")
    return flat


class _Server:
    """One server: its pool of idle connections and its up/down state."""

    def __init__(
        self,
        address: ServerAddress,
        options: TransportOptions,
        pool_size: int,
        backoff: float,
        max_backoff: float = _MAX_BACKOFF_S,
    ):
        self.address = address
        self.max_backoff = max_backoff
        self.options = options
        self.pool_size = pool_size
        self.first_backoff = backoff
        self.backoff = backoff
        self.down_until = 0.0
        self.cls: type[Transport] = transport_class(address.scheme)
        self._idle: list[Transport] = []
        self._lock = threading.Lock()
        self._closed = False
        self.rank_seed = address.url.encode()

    @property
    def up(self) -> bool:
        return time.monotonic() >= self.down_until

    def mark_down(self) -> None:
        with self._lock:
            self.down_until = time.monotonic() + self.backoff
            self.backoff = min(self.backoff * 2, self.max_backoff)
            idle, self._idle = self._idle, []
        for transport in idle:
            transport.close()

    def _checkout(self, timeout: float) -> tuple[Transport, bool]:
        with self._lock:
            if self._closed:
                raise ConnectError("the client is closed")
            if self._idle:
                return self._idle.pop(), True
            wait = self.down_until - time.monotonic()
        if wait > 0:
            raise ConnectError(f"{self.address} is down; next attempt in {wait:.2f} s")
        transport = self.cls(self.address, self.options)
        try:
            transport.connect(timeout)
        except (ConnectError, RequestTimeoutError):
            transport.close()
            self.mark_down()
            raise
        except BaseException:
            transport.close()
            raise
        with self._lock:
            self.backoff = self.first_backoff
        return transport, False

    def _checkin(self, transport: Transport) -> None:
        with self._lock:
            if not transport.broken and not self._closed and len(self._idle) < self.pool_size:
                self._idle.append(transport)
                return
        transport.close()

    def run(self, fn: Callable[[Transport], T], timeout: float) -> T:
        """Run ``fn`` on a pooled connection; a pooled connection found dead is replaced once."""
        transport, pooled = self._checkout(timeout)
        try:
            return fn(transport)
        except (ConnectError, RequestTimeoutError) as exc:
            if not pooled or not isinstance(exc, ConnectError):
                if isinstance(exc, ConnectError):
                    self.mark_down()
                raise
            # The pooled connection died (the server restarted, or idled us out): one fresh try.
            transport.close()
            transport, _ = self._checkout(timeout)
            try:
                return fn(transport)
            except ConnectError:
                self.mark_down()
                raise
        finally:
            self._checkin(transport)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for transport in idle:
            transport.close()


class Client:
    """A blocking client of one or several kvstrata cache servers (see the module docstring).

    Thread-safe: threads share the per-server connection pools.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        token: str | bytes | None = None,
        timeout: float | None = None,
        *,
        connect_timeout: float | None = None,
        pool_size: int | None = None,
        retry_backoff: float | None = None,
        max_backoff: float = _MAX_BACKOFF_S,
        checksum: bool = True,
        config: ClientConfig | None = None,
    ) -> None:
        config = config or ClientConfig()
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise InvalidArgumentError("a Client needs at least one server URL")
        if isinstance(token, str):
            token = token.encode()
        self.timeout = float(timeout if timeout is not None else config.timeout_s)
        if self.timeout <= 0:
            raise InvalidArgumentError("timeout must be positive")
        options = TransportOptions(
            token=token or None,
            connect_timeout=connect_timeout if connect_timeout is not None else config.connect_timeout_s,
            checksum=checksum,
        )
        size = pool_size if pool_size is not None else config.pool_size
        backoff = retry_backoff if retry_backoff is not None else config.retry_backoff_s
        addresses = [parse_url(u) for u in urls]
        if len({a.url for a in addresses}) != len(addresses):
            raise InvalidArgumentError("duplicate server URLs")
        self._servers = [_Server(a, options, max(1, size), backoff, max_backoff) for a in addresses]
        self._closed = False

    # -- plumbing --------------------------------------------------------------------------------------
    @property
    def urls(self) -> list[str]:
        """The servers' canonical URLs."""
        return [s.address.url for s in self._servers]

    def _timeout(self, timeout: float | None) -> float:
        if self._closed:
            raise ConnectError("the client is closed")
        return self.timeout if timeout is None else float(timeout)

    def _ranked(self, key: bytes) -> list[_Server]:
        if len(self._servers) == 1:
            return self._servers
        # Rendezvous (highest random weight) hashing: each key's servers in a stable order.
        return sorted(
            self._servers,
            key=lambda s: hashlib.blake2b(s.rank_seed + key, digest_size=8).digest(),
            reverse=True,
        )

    def _owner(self, key: bytes) -> _Server:
        ranked = self._ranked(key)
        for server in ranked:
            if server.up:
                return server
        if len(ranked) == 1:
            return ranked[0]  # its checkout raises ConnectError with the back-off left
        raise ConnectError("every server is down")

    def _group(self, keys: Sequence[bytes]) -> dict[_Server, list[int]]:
        if len(self._servers) == 1:
            return {self._owner(b""): list(range(len(keys)))} if keys else {}
        groups: dict[_Server, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(self._owner(key), []).append(i)
        return groups

    @property
    def _several(self) -> bool:
        return len(self._servers) > 1

    def _by_server(
        self,
        keys: Sequence[bytes],
        call: Callable[[Transport, list[int]], T],
        budget: float,
        *,
        skip_timeouts: bool,
    ) -> tuple[list[tuple[list[int], T]], list[int]]:
        """Run ``call(transport, indices)`` once per server for the ``keys`` it owns.

        With several servers, one found unreachable (``run`` marks it down) hands its keys to the next
        server in rendezvous order within this call, where later calls send them too; one that times out
        is skipped when ``skip_timeouts`` (else the timeout is raised). Returns each answering server's
        (indices, result) and the indices no server took. With one server its errors are raised.
        """
        answered: list[tuple[list[int], T]] = []
        pending = list(range(len(keys)))
        for _ in self._servers:
            unreachable: list[int] = []
            for server, idx in self._group([keys[i] for i in pending]).items():
                chosen = [pending[j] for j in idx]
                try:
                    result = server.run(lambda t, c=chosen: call(t, c), budget)  # type: ignore[misc]
                except ConnectError:
                    if not self._several:
                        raise
                    log.debug("server %s unavailable; its keys go to the next server", server.address)
                    unreachable.extend(chosen)
                    continue
                except RequestTimeoutError:
                    if not self._several or not skip_timeouts:
                        raise
                    log.debug("server %s timed out; its keys are skipped", server.address)
                    continue
                answered.append((chosen, result))
            pending = unreachable
            if not pending:
                break
        return answered, pending

    # -- the API ---------------------------------------------------------------------------------------
    def put(
        self, key: KeyLike, data: BufferLike, meta: ChunkMeta | None = None, *, timeout: float | None = None
    ) -> None:
        """Store one chunk (a contiguous tensor of any dtype, or any buffer) under ``key``."""
        self.put_many([key], [data], None if meta is None else [meta], timeout=timeout)

    def put_many(
        self,
        keys: Sequence[KeyLike],
        data: Sequence[BufferLike],
        metas: Sequence[ChunkMeta | None] | None = None,
        *,
        timeout: float | None = None,
    ) -> None:
        """Store several chunks (batched per server); raises the first per-chunk error after trying all."""
        budget = self._timeout(timeout)
        if len(keys) != len(data) or (metas is not None and len(metas) != len(keys)):
            raise InvalidArgumentError("put_many needs as many data (and metas) as keys")
        specs = []
        for i, key in enumerate(keys):
            digest, meta = _key_and_meta(key, None if metas is None else metas[i])
            specs.append(PutSpec(digest, _host_bytes(data[i]), meta))
        answered, left = self._by_server(
            [spec.key for spec in specs],
            lambda t, idx: t.put_many([specs[i] for i in idx], budget),
            budget,
            skip_timeouts=False,
        )
        if left:
            raise ConnectError(f"no server could be reached for {len(left)} of the chunks")
        first: KVStrataError | None = None
        for _, results in answered:
            for error in results:
                if error is not None and first is None:
                    first = error
        if first is not None:
            raise first

    def get(
        self, key: KeyLike, out: BufferLike | None = None, *, timeout: float | None = None
    ) -> torch.Tensor | None:
        """The chunk as a 1-D uint8 tensor (a view of ``out`` when given), or ``None`` on a miss."""
        return self.get_many([key], None if out is None else [out], timeout=timeout)[0]

    def get_many(
        self,
        keys: Sequence[KeyLike],
        outs: Sequence[BufferLike | None] | None = None,
        *,
        timeout: float | None = None,
    ) -> list[torch.Tensor | None]:
        """Fetch several chunks (one round trip per server); ``None`` entries are misses."""
        budget = self._timeout(timeout)
        digests = [check_key(k) for k in keys]
        if outs is not None and len(outs) != len(keys):
            raise InvalidArgumentError("get_many needs as many outs as keys")
        dests = [None if outs is None else _out_bytes(outs[i]) for i in range(len(keys))]
        results: list[torch.Tensor | None] = [None] * len(keys)
        answered, _ = self._by_server(
            digests,
            lambda t, idx: t.get_many([digests[i] for i in idx], [dests[i] for i in idx], budget),
            budget,
            skip_timeouts=True,
        )
        for idx, got in answered:
            for i, value in zip(idx, got, strict=True):
                results[i] = value
        return results

    @overload
    def exists(self, keys: bytes | ChunkKey, *, timeout: float | None = None) -> bool: ...
    @overload
    def exists(self, keys: Sequence[KeyLike], *, timeout: float | None = None) -> list[bool]: ...
    def exists(self, keys: Any, *, timeout: float | None = None) -> bool | list[bool]:
        """Whether the chunk (one key) or each chunk (a list of keys) is held, in any tier of its server."""
        if _is_single_key(keys):
            return self.exists([keys], timeout=timeout)[0]
        budget = self._timeout(timeout)
        digests = [check_key(k) for k in keys]
        out = [False] * len(digests)
        answered, _ = self._by_server(
            digests, lambda t, idx: t.exists([digests[i] for i in idx], budget), budget, skip_timeouts=True
        )
        for idx, got in answered:
            for i, value in zip(idx, got, strict=True):
                out[i] = value
        return out

    def lookup_prefix(self, keys: Sequence[KeyLike], *, timeout: float | None = None) -> PrefixResult:
        """How many leading chunks are held, and where: one round trip per server.

        ``tiers`` names the server-side tier of each found chunk, ``servers`` the URL of the server that
        holds it. With several servers each is asked about the keys it owns (a LOOKUP_PREFIX of them, in
        order); the prefix ends at the first key whose server does not hold it, or did not answer.
        """
        budget = self._timeout(timeout)
        digests = [check_key(k) for k in keys]
        answered, _ = self._by_server(
            digests,
            lambda t, idx: (t.address.url, t.lookup_prefix([digests[i] for i in idx], budget)),
            budget,
            skip_timeouts=True,
        )
        tiers: dict[int, str] = {}
        servers: dict[int, str] = {}
        for idx, (url, found) in answered:
            for j in range(found.num_chunks):
                tiers[idx[j]] = found.tiers[j] if j < len(found.tiers) else ""
                servers[idx[j]] = url
        count = 0
        while count in servers:
            count += 1
        return PrefixResult(
            count, tuple(tiers[i] for i in range(count)), tuple(servers[i] for i in range(count))
        )

    def delete(self, keys: KeyLike | Sequence[KeyLike], *, timeout: float | None = None) -> int:
        """Remove chunks (one key, or a list) from every tier of their server; returns how many were held.

        A lone key (16 bytes or a ChunkKey) is accepted as well as a list.
        """
        if _is_single_key(keys):
            keys = [keys]
        budget = self._timeout(timeout)
        digests = [check_key(k) for k in keys]
        answered, _ = self._by_server(
            digests, lambda t, idx: t.delete([digests[i] for i in idx], budget), budget, skip_timeouts=True
        )
        removed = sum(sum(got) for _, got in answered)
        return removed

    def stats(self, *, timeout: float | None = None) -> dict[str, dict[str, Any]]:
        """Per server URL: ``{"tiers": {tier: counters}, "server": counters}``.

        With several servers, one that cannot be reached or does not answer in time reports
        ``{"error": {"type": ..., "message": ...}}`` instead (the type: ``"ConnectError"`` or
        ``"RequestTimeoutError"``); :class:`ConnectError` only when no server answers.
        """
        budget = self._timeout(timeout)
        out: dict[str, dict[str, Any]] = {}
        for url, got in self._each_server(lambda t: t.stats(budget), budget).items():
            out[url] = got if not isinstance(got, KVStrataError) else {"error": _error_entry(got)}
        return out

    def ping(self, *, timeout: float | None = None) -> dict[str, float | None]:
        """Round-trip time per server URL, in seconds.

        With several servers, one that cannot be reached or does not answer in time maps to ``None``;
        :class:`ConnectError` only when no server answers.
        """
        budget = self._timeout(timeout)
        return {
            url: None if isinstance(got, KVStrataError) else got
            for url, got in self._each_server(lambda t: t.ping(budget), budget).items()
        }

    def _each_server(self, call: Callable[[Transport], T], budget: float) -> dict[str, T | KVStrataError]:
        """``call`` on every server, in turn; per URL its result or, with several servers, the
        :class:`ConnectError` or :class:`RequestTimeoutError` it raised. One server: its error is raised,
        as it is when no server answers."""
        out: dict[str, T | KVStrataError] = {}
        failed: list[KVStrataError] = []
        for server in self._servers:
            try:
                out[server.address.url] = server.run(call, budget)
            except (ConnectError, RequestTimeoutError) as exc:
                if not self._several:
                    raise
                log.debug("server %s did not answer: %s", server.address, exc)
                out[server.address.url] = exc
                failed.append(exc)
        if len(failed) == len(self._servers):
            raise ConnectError(f"no server answered ({failed[0]})") from failed[0]
        return out

    def close(self) -> None:
        """Close every pooled connection; idempotent."""
        self._closed = True
        for server in self._servers:
            server.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.urls!r})"


class AsyncClient:
    """The asyncio face of :class:`Client`: the same methods, awaited.

    Calls run on a private thread pool (the blocking transports release the GIL in their socket calls
    and copies), so many calls proceed concurrently without blocking the event loop.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        token: str | bytes | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        self._client = Client(url, token, timeout, **kwargs)
        workers = max(4, len(self._client.urls) * max(1, kwargs.get("pool_size") or ClientConfig().pool_size))
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kvstrata-client")

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    @property
    def urls(self) -> list[str]:
        """The servers' canonical URLs."""
        return self._client.urls

    async def put(
        self, key: KeyLike, data: BufferLike, meta: ChunkMeta | None = None, *, timeout: float | None = None
    ) -> None:
        """See :meth:`Client.put`."""
        await self._run(self._client.put, key, data, meta, timeout=timeout)

    async def put_many(
        self,
        keys: Sequence[KeyLike],
        data: Sequence[BufferLike],
        metas: Sequence[ChunkMeta | None] | None = None,
        *,
        timeout: float | None = None,
    ) -> None:
        """See :meth:`Client.put_many`."""
        await self._run(self._client.put_many, keys, data, metas, timeout=timeout)

    async def get(
        self, key: KeyLike, out: BufferLike | None = None, *, timeout: float | None = None
    ) -> torch.Tensor | None:
        """See :meth:`Client.get`."""
        return await self._run(self._client.get, key, out, timeout=timeout)

    async def get_many(
        self,
        keys: Sequence[KeyLike],
        outs: Sequence[BufferLike | None] | None = None,
        *,
        timeout: float | None = None,
    ) -> list[torch.Tensor | None]:
        """See :meth:`Client.get_many`."""
        return await self._run(self._client.get_many, keys, outs, timeout=timeout)

    @overload
    async def exists(self, keys: bytes | ChunkKey, *, timeout: float | None = None) -> bool: ...
    @overload
    async def exists(self, keys: Sequence[KeyLike], *, timeout: float | None = None) -> list[bool]: ...
    async def exists(self, keys: Any, *, timeout: float | None = None) -> bool | list[bool]:
        """See :meth:`Client.exists`."""
        return await self._run(self._client.exists, keys, timeout=timeout)

    async def lookup_prefix(self, keys: Sequence[KeyLike], *, timeout: float | None = None) -> PrefixResult:
        """See :meth:`Client.lookup_prefix`."""
        return await self._run(self._client.lookup_prefix, keys, timeout=timeout)

    async def delete(self, keys: KeyLike | Sequence[KeyLike], *, timeout: float | None = None) -> int:
        """See :meth:`Client.delete`."""
        return await self._run(self._client.delete, keys, timeout=timeout)

    async def stats(self, *, timeout: float | None = None) -> dict[str, dict[str, Any]]:
        """See :meth:`Client.stats`."""
        return await self._run(self._client.stats, timeout=timeout)

    async def ping(self, *, timeout: float | None = None) -> dict[str, float | None]:
        """See :meth:`Client.ping`."""
        return await self._run(self._client.ping, timeout=timeout)

    async def close(self) -> None:
        """Close the connections and the worker threads."""
        self._client.close()
        self._executor.shutdown(wait=False)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
