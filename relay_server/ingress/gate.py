"""The door of an input: failed-auth throttle, bucket credentials, provider signature.

Checked in that order and before anything is stored. The throttle and the credentials
need no body, so a refused sender's body is never read; the signature is checked over the
raw body once it is in. Every refusal is logged as `webhook_refused` with a reason and the
input id, never the credential, and every refused credential or signature counts against
its source in the shared `throttle.FailureThrottle`.

Wrong and missing credentials get the same 401 (with `WWW-Authenticate` naming the
scheme), and every failed signature the same one, so an answer tells a stranger nothing
about what was close. Once the bucket's credentials are checked they are removed from the
stored event: they were meant for the relay, not for the destination behind it.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
import time
import urllib.parse

import structlog
from aiohttp import hdrs, web

from relay_server import auth, models, throttle
from relay_server.ingress import signatures, source

log = structlog.get_logger(__name__)

REALM = "stowhook"
TOKEN_PARAMETER = "token"
CHALLENGE = {
    models.InputAuthKind.BASIC: f'Basic realm="{REALM}", charset="UTF-8"',
    models.InputAuthKind.TOKEN: f'Bearer realm="{REALM}"',
}


class Gate:
    def __init__(
        self, failures: throttle.FailureThrottle, trusted_proxies: tuple[source.Network, ...]
    ) -> None:
        self._failures = failures
        self._trusted = trusted_proxies
        self._verified = auth.VerifiedCache()

    async def admit(self, request: web.Request, route: models.Route) -> web.Response | None:
        """None to go on reading the body; else the answer (429 throttled, 401 refused)."""
        if route.bucket.input_auth is None and route.input.verification is None:
            return None
        sender = source.source_of(request, self._trusted)
        try:
            self._failures.check(sender)
        except throttle.TooManyFailures as exc:
            log.info("webhook_throttled", input_id=route.input.id, source=sender)
            return web.Response(
                status=429, text=f"{exc.message}\n", headers={"Retry-After": str(exc.retry_after_s)}
            )
        input_auth = route.bucket.input_auth
        if input_auth is None:
            return None
        reason = await self._credentials(request, input_auth)
        if reason is None:
            return None
        self._refused(route, sender, reason)
        return web.Response(
            status=401,
            text="missing or wrong credentials\n",
            headers={hdrs.WWW_AUTHENTICATE: CHALLENGE[input_auth.kind]},
        )

    def verify(
        self, request: web.Request, route: models.Route, body: bytes
    ) -> models.Nonce | web.Response | None:
        """The signature's nonce (None: no timestamp or no verification), or a 401."""
        verification = route.input.verification
        if verification is None:
            return None
        try:
            return signatures.verify(verification, request.headers, body, time.time())
        except signatures.SignatureRefused as exc:
            self._refused(route, source.source_of(request, self._trusted), exc.reason)
            return web.Response(status=401, text="invalid signature\n")

    async def _credentials(self, request: web.Request, input_auth: models.InputAuth) -> str | None:
        """None if the request carries the bucket's credential, else why not."""
        if input_auth.kind is models.InputAuthKind.BASIC:
            basic = basic_credentials(request.headers.get(hdrs.AUTHORIZATION, ""))
            if basic is None:
                return "missing_credentials"
            username, password = basic
            # Both halves are always checked: a wrong user name takes as long as a wrong password.
            user_ok = hmac.compare_digest(username.encode(), input_auth.username.encode())
            password_ok = await self._verified.check(
                f"basic\0{username}\0{password}", password, input_auth.secret_hash
            )
            return None if user_ok and password_ok else "wrong_credentials"
        token = bearer_token(request)
        if not token:
            return "missing_credentials"
        if await self._verified.check(f"token\0{token}", token, input_auth.secret_hash):
            return None
        return "wrong_credentials"

    def _refused(self, route: models.Route, sender: str, reason: str) -> None:
        self._failures.failed(sender)
        log.warning("webhook_refused", reason=reason, input_id=route.input.id, source=sender)


def replay(event: models.IncomingEvent) -> web.Response:
    """The answer to a signed webhook already accepted. Not counted as a failure: a sender
    retrying the very same signed bytes is not guessing."""
    log.warning(
        "webhook_refused", reason="replay", input_id=event.route.input.id, source=event.source
    )
    return web.Response(status=401, text="replay\n")


def basic_credentials(header: str) -> tuple[str, str] | None:
    """(user name, password) from `Basic <base64 of user:password>` (UTF-8), else None."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    username, sep, password = decoded.partition(":")
    return (username, password) if sep else None


def bearer_token(request: web.Request) -> str:
    """`Authorization: Bearer <t>`, else the `token` query parameter, else ''."""
    scheme, _, value = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.query.get(TOKEN_PARAMETER, "")


def admitted(event: models.IncomingEvent, nonce: models.Nonce | None) -> models.IncomingEvent:
    """The event to store: with its signature's nonce, without the bucket's credential
    (the Authorization header and, for token auth, the `token` query parameter)."""
    input_auth = event.route.bucket.input_auth
    if input_auth is None:
        return event if event.nonce is nonce else dataclasses.replace(event, nonce=nonce)
    headers = tuple((k, v) for k, v in event.headers if k.lower() != "authorization")
    query = event.query
    if input_auth.kind is models.InputAuthKind.TOKEN and query:
        query = "&".join(
            part
            for part in query.split("&")
            if urllib.parse.unquote_plus(part.partition("=")[0]) != TOKEN_PARAMETER
        )
    return dataclasses.replace(event, headers=headers, query=query, nonce=nonce)


GATE = web.AppKey("gate", Gate)
