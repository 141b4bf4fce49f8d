"""The provider signature matrix: what each scheme accepts and what it refuses.

Standard Webhooks and Stripe requests are signed by their official libraries
(`standardwebhooks`, `stripe`), and those libraries' own verifiers must agree with ours on
every accepted and every tampered request. GitHub and Slack are also checked against the
examples in their documentation. Bodies and secrets vary under hypothesis.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import time

import pytest
import standardwebhooks
import stripe
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from relay_server import models
from relay_server.ingress import signatures

K = models.VerifyKind
TOLERANCE_S = 300
TIMESTAMPED = {K.STRIPE, K.SLACK, K.STANDARD}
LIBRARY_SIGNED = {K.STRIPE, K.STANDARD}
GENERIC = {"header": "X-Signature", "encoding": "base64", "prefix": "sha256="}


def verification(kind: K, *secrets: str) -> models.Verification:
    extra = GENERIC if kind is K.HMAC else {}
    return models.Verification(kind=kind, secrets=secrets, tolerance_s=TOLERANCE_S, **extra)


def _mac(secret: bytes, message: bytes) -> bytes:
    return hmac.new(secret, message, hashlib.sha256).digest()


def sign(
    kind: K, secret: str, body: bytes, ts: int, msg_id: str = "msg_2KWPBgLlAfxdpx2AI"
) -> CIMultiDict[str]:
    """The headers the provider would send (Stripe and Standard Webhooks: their libraries)."""
    if kind is K.STANDARD:
        signature = standardwebhooks.Webhook(secret).sign(
            msg_id, dt.datetime.fromtimestamp(ts, dt.UTC), body.decode()
        )
        return CIMultiDict(
            {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": signature}
        )
    if kind is K.STRIPE:
        header = stripe.WebhookSignature.generate_signature_header(body.decode(), secret, ts)
        return CIMultiDict({"Stripe-Signature": header})
    key = secret.encode()
    if kind is K.GITHUB:
        return CIMultiDict({"X-Hub-Signature-256": "sha256=" + _mac(key, body).hex()})
    if kind is K.SHOPIFY:
        return CIMultiDict({"X-Shopify-Hmac-Sha256": base64.b64encode(_mac(key, body)).decode()})
    if kind is K.SLACK:
        signature = "v0=" + _mac(key, f"v0:{ts}:".encode() + body).hex()
        return CIMultiDict({"X-Slack-Signature": signature, "X-Slack-Request-Timestamp": str(ts)})
    return CIMultiDict({"X-Signature": "sha256=" + base64.b64encode(_mac(key, body)).decode()})


def official_accepts(kind: K, secret: str, body: bytes, headers: CIMultiDict[str]) -> bool:
    """The provider library's own verdict (it reads the clock itself)."""
    try:
        if kind is K.STANDARD:
            standardwebhooks.Webhook(secret).verify(body, dict(headers), json_parse=False)
        else:
            header = headers.get("Stripe-Signature")
            stripe.WebhookSignature.verify_header(body, header, secret, TOLERANCE_S)
    except (
        standardwebhooks.webhooks.WebhookVerificationError,
        stripe.SignatureVerificationError,
        UnicodeDecodeError,  # a tampered body that is no longer text: refused as well
    ):
        return False
    return True


def refusal(
    kind: K, secrets: tuple[str, ...], body: bytes, headers: CIMultiDict[str], now: float
) -> str | None:
    try:
        signatures.verify(verification(kind, *secrets), headers, body, now)
    except signatures.SignatureRefused as exc:
        return exc.reason
    return None


# ---- tampering -----------------------------------------------------------------------------

# kind -> (header, text before the signature, encoding)
SIGNATURE_AT = {
    K.GITHUB: ("X-Hub-Signature-256", "sha256=", "hex"),
    K.SHOPIFY: ("X-Shopify-Hmac-Sha256", "", "base64"),
    K.SLACK: ("X-Slack-Signature", "v0=", "hex"),
    K.STRIPE: ("Stripe-Signature", "v1=", "hex"),
    K.STANDARD: ("webhook-signature", "v1,", "base64"),
    K.HMAC: ("X-Signature", "sha256=", "base64"),
}
TIMESTAMP_HEADER = {
    K.SLACK: "X-Slack-Request-Timestamp",
    K.STANDARD: "webhook-timestamp",
}


def flip_byte(data: bytes, index: int = 0) -> bytes:
    if not data:
        return b"\x01"
    index %= len(data)
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def flip_signature(kind: K, headers: CIMultiDict[str]) -> CIMultiDict[str]:
    """The headers with one byte of the signature changed."""
    name, marker, encoding = SIGNATURE_AT[kind]
    head, _, tail = headers[name].partition(marker) if marker else ("", "", headers[name])
    signature, sep, rest = tail.partition(",") if kind is K.STRIPE else (tail, "", "")
    if encoding == "hex":
        flipped = flip_byte(bytes.fromhex(signature)).hex()
    else:
        flipped = base64.b64encode(flip_byte(base64.b64decode(signature))).decode()
    changed = headers.copy()
    changed[name] = f"{head}{marker}{flipped}{sep}{rest}"
    return changed


def shift_timestamp(kind: K, headers: CIMultiDict[str]) -> CIMultiDict[str]:
    changed = headers.copy()
    if kind is K.STRIPE:
        ts = int(changed["Stripe-Signature"].split(",")[0].removeprefix("t="))
        changed["Stripe-Signature"] = changed["Stripe-Signature"].replace(f"t={ts}", f"t={ts + 1}")
    else:
        name = TIMESTAMP_HEADER[kind]
        changed[name] = str(int(changed[name]) + 1)
    return changed


def secrets_for(kind: K) -> st.SearchStrategy[str]:
    if kind is K.STANDARD:
        return st.binary(min_size=16, max_size=64).map(
            lambda key: "whsec_" + base64.b64encode(key).decode()
        )
    return st.text(
        alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=8, max_size=64
    )


def bodies_for(kind: K) -> st.SearchStrategy[bytes]:
    text = st.text(max_size=2000).map(str.encode)
    return text if kind in LIBRARY_SIGNED else st.one_of(text, st.binary(max_size=2000))


def other_secret(kind: K, secret: str) -> str:
    """`secret` with one byte changed."""
    if kind is K.STANDARD:
        key = base64.b64decode(secret.removeprefix("whsec_"))
        return "whsec_" + base64.b64encode(flip_byte(key)).decode()
    return secret[:-1] + ("A" if secret[-1] != "A" else "B")


# ---- the matrix --------------------------------------------------------------------------

ALL = list(K)


@pytest.mark.parametrize("kind", ALL)
@given(data=st.data())
def test_valid_requests_are_accepted_and_every_one_byte_change_refused(
    kind: K, data: st.DataObject
) -> None:
    secret = data.draw(secrets_for(kind), "secret")
    body = data.draw(bodies_for(kind), "body")
    now = time.time()
    headers = sign(kind, secret, body, int(now))

    assert refusal(kind, (secret,), body, headers, now) is None
    tampered: dict[str, tuple[tuple[str, ...], bytes, CIMultiDict[str]]] = {
        "body": ((secret,), flip_byte(body, data.draw(st.integers(0, 4096))), headers),
        "secret": ((other_secret(kind, secret),), body, headers),
    }
    tampered["signature"] = ((secret,), body, flip_signature(kind, headers))
    if kind in TIMESTAMPED:
        tampered["timestamp"] = ((secret,), body, shift_timestamp(kind, headers))
    for what, (secrets, sent_body, sent_headers) in tampered.items():
        assert refusal(kind, secrets, sent_body, sent_headers, now) == "bad_signature", what

    if kind in LIBRARY_SIGNED:  # the official verifiers agree on every case
        assert official_accepts(kind, secret, body, headers)
        for what, (secrets, sent_body, sent_headers) in tampered.items():
            assert not official_accepts(kind, secrets[0], sent_body, sent_headers), what


@pytest.mark.parametrize("kind", sorted(TIMESTAMPED))
@pytest.mark.parametrize(
    ("offset_s", "reason"),
    [
        (-TOLERANCE_S - 1, "stale_timestamp"),
        (TOLERANCE_S + 1, "future_timestamp"),
        (-86_400, "stale_timestamp"),
        (-TOLERANCE_S, None),
        (TOLERANCE_S, None),
    ],
)
def test_timestamps_outside_the_tolerance_are_refused(
    kind: K, offset_s: int, reason: str | None
) -> None:
    secret = "whsec_" + base64.b64encode(b"k" * 24).decode() if kind is K.STANDARD else "sk_test"
    now = 1_800_000_000
    headers = sign(kind, secret, b'{"id": 1}', now + offset_s)
    assert refusal(kind, (secret,), b'{"id": 1}', headers, now) == reason


@pytest.mark.parametrize("kind", ALL)
def test_any_configured_secret_may_match_while_rotating(kind: K) -> None:
    old, new = ("whsec_" + base64.b64encode(k * 24).decode() for k in (b"o", b"n"))
    if kind is not K.STANDARD:
        old, new = "old-secret-1", "new-secret-2"
    now = time.time()
    for used in (old, new):
        headers = sign(kind, used, b"{}", int(now))
        assert refusal(kind, (old, new), b"{}", headers, now) is None
    headers = sign(kind, old, b"{}", int(now))
    assert refusal(kind, (new,), b"{}", headers, now) == "bad_signature"


def test_standard_webhooks_accepts_any_of_several_signatures() -> None:
    """The sender signs with its old and new secret during its own rotation."""
    old, new = ("whsec_" + base64.b64encode(k * 32).decode() for k in (b"o", b"n"))
    now = int(time.time())
    first = sign(K.STANDARD, old, b"{}", now)
    second = sign(K.STANDARD, new, b"{}", now)
    headers = first.copy()
    headers["webhook-signature"] = (
        f"v1a,ignored {first['webhook-signature']} {second['webhook-signature']}"
    )
    assert refusal(K.STANDARD, (new,), b"{}", headers, now) is None
    assert official_accepts(K.STANDARD, new, b"{}", headers)


def test_stripe_accepts_any_v1_and_ignores_other_schemes() -> None:
    now = int(time.time())
    header = stripe.WebhookSignature.generate_signature_header("{}", "whsec_live", now)
    _, v1 = header.split(",")
    combined = CIMultiDict({"Stripe-Signature": f"t={now},v1={'0' * 64},{v1},v0=abc"})
    assert refusal(K.STRIPE, ("whsec_live",), b"{}", combined, now) is None
    only_v0 = CIMultiDict({"Stripe-Signature": f"t={now},v0={v1.removeprefix('v1=')}"})
    assert refusal(K.STRIPE, ("whsec_live",), b"{}", only_v0, now) == "bad_signature"


def test_the_documented_github_and_slack_examples_verify() -> None:
    github = CIMultiDict(
        {
            "X-Hub-Signature-256": "sha256="
            "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        }
    )
    assert refusal(K.GITHUB, ("It's a Secret to Everybody",), b"Hello, World!", github, 0) is None
    slack_body = (
        b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&"
        b"channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&"
        b"command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2F"
        b"commands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&"
        b"trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c"
    )
    slack = CIMultiDict(
        {
            "X-Slack-Request-Timestamp": "1531420618",
            "X-Slack-Signature": "v0="
            "a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503",
        }
    )
    secret = "8f742231b10e8888abcd99yyyzzz85a5"
    assert refusal(K.SLACK, (secret,), slack_body, slack, 1531420618) is None
    assert refusal(K.SLACK, (secret,), slack_body, slack, 1531420618 + 301) == "stale_timestamp"


@pytest.mark.parametrize("kind", ALL)
def test_missing_or_malformed_headers_are_refused(kind: K) -> None:
    secret = "whsec_" + base64.b64encode(b"x" * 24).decode() if kind is K.STANDARD else "s3cret"
    now = int(time.time())
    assert refusal(kind, (secret,), b"{}", CIMultiDict(), now) in (
        "missing_signature",
        "malformed_timestamp",
    )
    headers = sign(kind, secret, b"{}", now)
    garbled = headers.copy()
    garbled[SIGNATURE_AT[kind][0]] = "%%% not a signature %%%"
    assert refusal(kind, (secret,), b"{}", garbled, now) in ("bad_signature", "malformed_timestamp")
    if kind in TIMESTAMP_HEADER:
        garbled = headers.copy()
        garbled[TIMESTAMP_HEADER[kind]] = "1e9"
        assert refusal(kind, (secret,), b"{}", garbled, now) == "malformed_timestamp"


def test_no_configured_secret_matches_nothing() -> None:
    headers = sign(K.GITHUB, "", b"{}", 0)  # an empty key signs too: it must not pass
    assert refusal(K.GITHUB, (), b"{}", headers, 0) == "bad_signature"
    standard = sign(K.STANDARD, "whsec_" + base64.b64encode(b"k" * 24).decode(), b"{}", 0)
    assert refusal(K.STANDARD, ("whsec_!!!",), b"{}", standard, 0) == "bad_signature"


@pytest.mark.parametrize("kind", sorted(TIMESTAMPED))
def test_the_nonce_names_what_was_signed(kind: K) -> None:
    """The same request twice has one nonce (a replay); the provider's re-signed retry has
    another. Schemes without a timestamp have none."""
    secret = "whsec_" + base64.b64encode(b"n" * 24).decode() if kind is K.STANDARD else "sk"
    now = int(time.time())

    def verify(headers: CIMultiDict[str]) -> models.Nonce | None:
        return signatures.verify(verification(kind, secret), headers, b"{}", now)

    first = verify(sign(kind, secret, b"{}", now))
    assert first is not None and len(first.value) == 64
    assert first == verify(sign(kind, secret, b"{}", now))
    assert verify(sign(kind, secret, b"{}", now - 1)) != first
    assert first.expires_at_ms >= (now + TOLERANCE_S) * 1000
    assert (
        signatures.verify(verification(K.GITHUB, "s"), sign(K.GITHUB, "s", b"", 0), b"", 0) is None
    )


@pytest.mark.parametrize(
    ("kind", "secret", "problem"),
    [
        (K.STANDARD, "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "does not start with whsec_"),
        (K.STANDARD, "whsec_not base64!", "not base64"),
        (K.STANDARD, "whsec_", "not base64 or is empty"),
        (K.GITHUB, " padded ", "surrounding whitespace"),
    ],
)
def test_bad_secrets_are_named(kind: K, secret: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        signatures.check_secret(kind, secret)
    signatures.check_secret(K.STANDARD, "whsec_" + base64.b64encode(b"ok" * 12).decode())
