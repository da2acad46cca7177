"""Authorization by peer identity: who may call which RPC, checked in one place.

Under mutual TLS every caller presents a certificate that the server's CA signed.
Its DNS subject alternative names are the caller's identities ("shop",
"operator"...). `Authorizer` is the one server interceptor that compares them with
a `Policy` before any servicer runs:

* no client certificate (plaintext, or TLS without one): UNAUTHENTICATED;
* an identity the policy does not allow for that method, or a method the policy
  does not name: PERMISSION_DENIED (fail closed).

A refused call reaches no servicer, so it changes nothing; it is logged with the
caller's identity and address. The protocol's own rules come ready-made
(`participant_rules`, `coordinator_rules`); a service adds its API with `grant`.

    policy = Policy(participant_rules(["shop"]) | grant(["operator"], "wallet.v1.Wallet", "Deposit"))
    server = grpc.aio.server(interceptors=[Authorizer(policy)])
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import grpc
import structlog

from twopc.security import limits
from twopc.v1 import coordinator_pb2, participant_pb2

_log = structlog.get_logger("twopc.security.auth")

ANYONE = "*"
"""In an allowlist: any authenticated identity (a certificate the CA signed)."""

PARTICIPANT_SERVICE = participant_pb2.DESCRIPTOR.services_by_name["Participant"].full_name
COORDINATOR_SERVICE = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name


def grant(identities: Iterable[str], service: str, *methods: str) -> dict[str, frozenset[str]]:
    """Rules letting `identities` call `methods` of `service` ("pkg.v1.Service")."""
    allowed = frozenset(identities)
    return {f"/{service}/{m}": allowed for m in methods}


def participant_rules(coordinators: Iterable[str]) -> dict[str, frozenset[str]]:
    """Only coordinators may drive a participant: Prepare, PrepareMany, Commit,
    CommitMany, Abort."""
    return grant(coordinators, PARTICIPANT_SERVICE, "Prepare", "PrepareMany", "Commit", "CommitMany", "Abort")


def coordinator_rules(participants: Iterable[str]) -> dict[str, frozenset[str]]:
    """Only participants may ask a coordinator for an outcome."""
    return grant(participants, COORDINATOR_SERVICE, "GetOutcome")


def operations_rules(identities: Iterable[str]) -> dict[str, frozenset[str]]:
    """Health checking and server reflection (`twopc.observe.health`): who may probe and list."""
    return grant(identities, "grpc.health.v1.Health", "Check", "Watch") | grant(
        identities, "grpc.reflection.v1alpha.ServerReflection", "ServerReflectionInfo"
    )


HEALTH_RULES = grant([ANYONE], "grpc.health.v1.Health", "Check", "Watch")
"""What every Policy allows unless its rules name the method: health checks from any
authenticated caller (a load balancer or probe with a certificate of the CA)."""


@dataclass(frozen=True)
class Policy:
    """Who may call what: full method name ("/pkg.v1.Service/Method") to the
    identities allowed (`ANYONE` = every authenticated caller). Methods not named
    are refused, except health checks (`HEALTH_RULES`), which any authenticated
    caller may make unless the rules name them. Build one from the rule helpers,
    merged as dicts::

        Policy({**participant_rules(["shop"]), **grant(["operator"], "wallet.v1.Wallet", "Deposit")})
    """

    rules: Mapping[str, frozenset[str]]

    def allows(self, method: str, identities: Iterable[str]) -> bool:
        allowed = self.rules.get(method, HEALTH_RULES.get(method))
        if allowed is None:
            return False
        return ANYONE in allowed or not allowed.isdisjoint(identities)


def peer_identities(context: grpc.aio.ServicerContext[Any, Any]) -> list[str]:
    """The caller's identities: the DNS names in its verified client certificate,
    without IP addresses and "localhost" (which name hosts, not callers). Empty
    when the caller presented no certificate."""
    names = context.auth_context().get("x509_subject_alternative_name", [])
    found = []
    for raw in names:
        name = raw.decode("utf-8", "replace")
        if name == "localhost" or _is_ip(name):
            continue
        found.append(name)
    return found


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


_Behaviour = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
_Streaming = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]


def _raw(data: bytes) -> bytes:
    return data


BAD_REQUEST = "the request body is not a valid message for this method"
"""INVALID_ARGUMENT's fixed message for bytes that do not parse: it names no type,
no exception and no input."""


class Authorizer(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]  # grpc-stubs: generic for no reason here
    """The server interceptor that enforces a `Policy` on every RPC, unary or
    streaming, before the request is parsed.

    The handler's request deserializer is replaced by one that keeps the raw
    bytes: the caller is checked first (PERMISSION_DENIED or UNAUTHENTICATED
    without parsing a byte), then the request is parsed, and bytes that are not a
    valid message get INVALID_ARGUMENT with `BAD_REQUEST` (never UNKNOWN naming a
    parser's exception). With `policy=None` (plaintext: no caller has a name) only
    the parsing part applies; `twopc.rpc.server` installs one that way when given none.
    """

    def __init__(self, policy: Policy | None) -> None:
        self.policy = policy

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # an unknown method: UNIMPLEMENTED, nothing to guard
        method: str = handler_call_details.method
        parse = handler.request_deserializer or _raw
        serdes = {"request_deserializer": _raw, "response_serializer": handler.response_serializer}

        async def parsed(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                return parse(raw)
            except Exception:  # any parser failure is the caller's bad bytes, whatever it raises
                _log.info("unparsable_request", method=method, size=len(raw), peer=limits.clip(context.peer()))
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, BAD_REQUEST)
                raise  # unreachable: abort raises

        async def stream_of(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async for raw in requests:
                yield await parsed(raw, context)

        # grpc.aio behaviours are coroutines (one response) or async generators (a stream).
        if handler.unary_unary is not None:
            unary = cast(_Behaviour, handler.unary_unary)

            async def guarded(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                await self.check(method, context)
                return await unary(await parsed(request, context), context)

            return grpc.unary_unary_rpc_method_handler(guarded, **serdes)
        if handler.stream_unary is not None:
            gathered = cast(_Behaviour, handler.stream_unary)

            async def guarded_in(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                await self.check(method, context)
                return await gathered(stream_of(requests, context), context)

            return grpc.stream_unary_rpc_method_handler(guarded_in, **serdes)
        streaming = cast(_Streaming, handler.unary_stream or handler.stream_stream)
        client_streams = handler.stream_stream is not None

        async def guarded_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            await self.check(method, context)
            request = stream_of(request, context) if client_streams else await parsed(request, context)
            async for response in streaming(request, context):
                yield response

        make = grpc.stream_stream_rpc_method_handler if client_streams else grpc.unary_stream_rpc_method_handler
        return make(guarded_stream, **serdes)

    async def check(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Aborts the call unless the policy allows its caller (no policy: plaintext, no check)."""
        if self.policy is None:
            return
        identities = peer_identities(context)
        if identities and self.policy.allows(method, identities):
            return
        code = grpc.StatusCode.PERMISSION_DENIED if identities else grpc.StatusCode.UNAUTHENTICATED
        who = ",".join(limits.clip(i) for i in identities[:4]) or "(no certificate)"
        _log.warning("refused", method=method, code=code.name, identity=who, peer=limits.clip(context.peer()))
        if identities:
            await context.abort(code, f"{who} may not call {method}")
        await context.abort(code, f"{method} needs a client certificate (mutual TLS)")
