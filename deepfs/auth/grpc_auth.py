"""Per-call authentication for gRPC (the control service), on the same keys as the framed protocol.

Rules: every call carries metadata ``deepfs-identity`` (base64 of the
identity's msgpack), ``deepfs-nonce`` (32 hex digits, fresh per call),
``deepfs-time`` (unix milliseconds) and ``deepfs-mac`` = hex
``HMAC(secret, "deepfs-grpc-v1\\0" + method + "\\0" + time + "\\0" + nonce)``
over the metadata strings as sent. The server re-derives the key's secret
(``KeyVerifier``), refuses a time more than ``WINDOW_S`` away from its clock
and a nonce seen inside that window (a bounded replay cache: once full, the
oldest entry is dropped and every call not newer than it is refused as
stale, so nothing ever replays), then checks the method's role rule. It
answers with trailing metadata ``deepfs-server-mac`` = hex
``HMAC(secret, "deepfs-grpc-server\\0" + nonce)``, which the client checks
(mutual): a server that does not know the secret is a ``PermissionError``.

The check runs inside the handler's thread, which then reads the caller with
``current_principal()``. Only unary-unary methods exist in DeepFS; other
kinds pass through unchanged and are refused.
"""

from __future__ import annotations

import base64
import binascii
import contextvars
import errno
import heapq
import hmac
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import grpc
import msgpack

from deepfs.auth.handshake import KeyVerifier
from deepfs.auth.identity import AuthError, Identity
from deepfs.auth.keys import Key, hmac_sha256

WINDOW_S = 120.0
REPLAY_CACHE_ENTRIES = 100_000
_CALL_LABEL = b"deepfs-grpc-v1\0"
_SERVER_LABEL = b"deepfs-grpc-server\0"
MD_IDENTITY = "deepfs-identity"
MD_NONCE = "deepfs-nonce"
MD_TIME = "deepfs-time"
MD_MAC = "deepfs-mac"
MD_SERVER_MAC = "deepfs-server-mac"

_principal: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("deepfs_grpc_principal", default=None)


def current_principal() -> Identity | None:
    """The identity of the call being served (inside a servicer method); None without the interceptor."""
    return _principal.get()


def call_mac(secret: bytes, method: str, time_ms: str, nonce: str) -> str:
    return hmac_sha256(secret, _CALL_LABEL + f"{method}\0{time_ms}\0{nonce}".encode()).hex()


def server_mac(secret: bytes, nonce: str) -> str:
    return hmac_sha256(secret, _SERVER_LABEL + nonce.encode()).hex()


def call_metadata(key: Key, method: str, now: float) -> list[tuple[str, str]]:
    """The metadata that authenticates one call of ``method`` (``/package.Service/Method``)."""
    identity = base64.b64encode(key.identity.canonical()).decode()
    nonce = os.urandom(16).hex()
    time_ms = str(int(now * 1000))
    return [(MD_IDENTITY, identity), (MD_NONCE, nonce), (MD_TIME, time_ms),
            (MD_MAC, call_mac(key.secret, method, time_ms, nonce))]


class ReplayCache:
    """Nonces seen inside the window, at most ``max_entries``; thread-safe."""

    def __init__(self, window_s: float = WINDOW_S, max_entries: int = REPLAY_CACHE_ENTRIES) -> None:
        self.window_ms = int(window_s * 1000)
        self.max_entries = max_entries
        self._seen: set[str] = set()
        self._by_time: list[tuple[int, str]] = []
        self._floor_ms = -1  # calls at or before this time are refused: their nonces may be forgotten
        self._lock = threading.Lock()

    def admit(self, nonce: str, time_ms: int, now_ms: int) -> bool:
        """Remember ``nonce``; False if it was seen (a replay) or is too old to tell."""
        with self._lock:
            while self._by_time and self._by_time[0][0] < now_ms - self.window_ms:
                self._seen.discard(heapq.heappop(self._by_time)[1])
            if time_ms <= self._floor_ms or nonce in self._seen:
                return False
            self._seen.add(nonce)
            heapq.heappush(self._by_time, (time_ms, nonce))
            while len(self._by_time) > self.max_entries:
                dropped_ms, dropped = heapq.heappop(self._by_time)
                self._seen.discard(dropped)
                self._floor_ms = max(self._floor_ms, dropped_ms)
            return True


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


class _Checker:
    def __init__(self, verifier: KeyVerifier, rules: Mapping[str, frozenset[str]], clock: Callable[[], float],
                 replay: ReplayCache) -> None:
        self.verifier = verifier
        self.rules = rules
        self.clock = clock
        self.replay = replay

    def check(self, method: str, metadata: Any) -> tuple[Identity, bytes, str]:
        """``(identity, secret, nonce)`` of an authentic call allowed to ``method``; else ``_Refused``."""
        md: dict[str, str] = {}
        for item in metadata or ():
            key, value = item[0], item[1]
            if isinstance(value, str) and key in (MD_IDENTITY, MD_NONCE, MD_TIME, MD_MAC):
                md[key] = value
        if len(md) != 4:
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "no DeepFS key: the call carries no credentials")
        try:
            raw = base64.b64decode(md[MD_IDENTITY], validate=True)
            if len(raw) > 4096:
                raise ValueError("identity too long")
            wire = msgpack.unpackb(raw, raw=False, strict_map_key=True)
            nonce = md[MD_NONCE]
            if len(nonce) != 32 or len(bytes.fromhex(nonce)) != 16:
                raise ValueError("bad nonce")
            time_text = md[MD_TIME]
            if not time_text.isdigit() or len(time_text) > 16:
                raise ValueError("bad time")
            identity, secret = self.verifier.secret_for({"identity": wire}, self.clock())
        except AuthError as exc:
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, f"key refused: {exc}") from None
        except (ValueError, binascii.Error, TypeError, msgpack.ExtraData, msgpack.FormatError,
                msgpack.StackError):
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "malformed DeepFS credentials") from None
        if not hmac.compare_digest(md[MD_MAC].encode(), call_mac(secret, method, time_text, nonce).encode()):
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED,
                           "wrong key: the call's mac does not match (another cluster secret, or an edited key)")
        now_ms = int(self.clock() * 1000)
        if abs(int(time_text) - now_ms) > self.replay.window_ms:
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "stale call: its time is too far from the server's "
                           "clock (keep clocks within 2 minutes)")
        if not self.replay.admit(nonce, int(time_text), now_ms):
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "replayed call refused")
        allowed = self.rules.get(method.rsplit("/", 1)[-1])
        if allowed is not None and identity.role not in allowed:
            raise _Refused(grpc.StatusCode.PERMISSION_DENIED,
                           f"key {identity.name!r} (role {identity.role}) may not call {method.rsplit('/', 1)[-1]}")
        return identity, secret, nonce


class _ServerInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, checker: _Checker) -> None:
        self._checker = checker

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        if handler.unary_unary is None:
            return _refuse_streaming(handler)
        inner = handler.unary_unary
        checker = self._checker

        def authenticated(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                identity, secret, nonce = checker.check(method, context.invocation_metadata())
            except _Refused as refused:
                context.abort(refused.code, refused.detail)
                raise AssertionError("grpc's abort returns only by raising") from None
            context.set_trailing_metadata(((MD_SERVER_MAC, server_mac(secret, nonce)),))
            token = _principal.set(identity)
            try:
                return inner(request, context)
            finally:
                _principal.reset(token)

        return grpc.unary_unary_rpc_method_handler(
            authenticated, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


def _refuse_streaming(handler: Any) -> Any:
    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "streaming calls are not authenticated")

    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse, handler.request_deserializer,
                                                    handler.response_serializer)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse, handler.request_deserializer,
                                                    handler.response_serializer)
    return grpc.stream_stream_rpc_method_handler(refuse, handler.request_deserializer, handler.response_serializer)


def grpc_server_interceptor(verifier: KeyVerifier, rules: Mapping[str, frozenset[str]], *,
                            clock: Callable[[], float] = time.time,
                            replay_cache: ReplayCache | None = None) -> grpc.ServerInterceptor:
    """Authenticate every call with a key; ``rules``: method short name -> roles allowed (others: any key)."""
    return _ServerInterceptor(_Checker(verifier, rules, clock, replay_cache or ReplayCache()))


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


class _ClientInterceptor(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, key: Key, address: str, clock: Callable[[], float]) -> None:
        self._key = key
        self._address = address
        self._clock = clock

    def intercept_unary_unary(self, continuation: Callable[[Any, Any], Any], client_call_details: Any,
                              request: Any) -> Any:
        method = client_call_details.method
        method_text = method.decode() if isinstance(method, bytes) else method
        md = call_metadata(self._key, method_text, self._clock())
        nonce = md[1][1]
        details = _CallDetails(method, client_call_details.timeout,
                               list(client_call_details.metadata or ()) + md, client_call_details.credentials,
                               getattr(client_call_details, "wait_for_ready", None),
                               getattr(client_call_details, "compression", None))
        call = continuation(details, request)
        if call.exception() is not None:
            return call  # an error status proves nothing and grants nothing: pass it on as is
        got = ""
        for item in call.trailing_metadata() or ():
            if item[0] == MD_SERVER_MAC and isinstance(item[1], str):
                got = item[1]
        if not hmac.compare_digest(got.encode(), server_mac(self._key.secret, nonce).encode()):
            raise PermissionError(errno.EACCES, f"server {self._address} is not genuine: "
                                                f"{'wrong' if got else 'no'} server mac on {method_text}")
        return call


def authenticated_channel(address: str, key: Key | None, tls_ca_file: str = "", *,
                          clock: Callable[[], float] = time.time,
                          options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A channel whose calls carry ``key``'s credentials and check the server's; key None: a plain
    channel (authenticating servers refuse its calls). ``tls_ca_file``: TLS, trusting that CA.
    ``options``: grpc channel options (e.g. reconnect backoff)."""
    if tls_ca_file:
        from deepfs.tls import grpc_channel_credentials  # a ConfigError naming an unreadable file

        channel = grpc.secure_channel(address, grpc_channel_credentials(tls_ca_file), options=list(options))
    else:
        channel = grpc.insecure_channel(address, options=list(options))
    if key is None:
        return channel
    return grpc.intercept_channel(channel, _ClientInterceptor(key, address, clock))
