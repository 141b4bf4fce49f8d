"""Per-input settings round-trip through the database; signing secrets never rest in clear."""

from __future__ import annotations

import sqlalchemy as sa

from relay_server import models
from relay_server.store import tables
from tests.integration.conftest import Installation

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


async def test_settings_round_trip_and_secrets_are_sealed(installed: Installation) -> None:
    store, input_id = installed.store, installed.route.input.id
    verification = models.Verification(
        kind=models.VerifyKind.STANDARD, secrets=(SECRET, "whsec_old"), tolerance_s=120
    )
    response = models.ResponseMode(
        kind=models.ResponseKind.STATIC, status=202, headers=(("X-Ok", "1"),), body=b"thanks"
    )
    limit = models.RateLimit(per_s=5.0, burst=10)
    await store.set_verification(input_id, verification)
    await store.set_response(input_id, response)
    await store.set_rate_limit(input_id, limit)
    route = await store.route(input_id)
    assert route is not None
    assert route.input.verification == verification
    assert (route.input.response, route.input.rate_limit) == (response, limit)

    async with store.db.read() as conn:
        row = (await conn.execute(sa.select(tables.inputs))).one()
    stored = b"".join(str(value).encode() for value in row if value is not None)
    assert SECRET.encode() not in stored and b"whsec_old" not in stored, "a secret at rest"
    assert row.verify_secrets_sealed is not None

    await store.set_verification(input_id, None)
    await store.set_response(input_id, models.ResponseMode())
    await store.set_rate_limit(input_id, None)
    route = await store.route(input_id)
    assert route is not None
    assert (route.input.verification, route.input.response, route.input.rate_limit) == (
        None,
        models.ResponseMode(),
        None,
    )


async def test_bucket_input_auth_round_trips(installed: Installation) -> None:
    store = installed.store
    auth = models.InputAuth(kind=models.InputAuthKind.BASIC, username="u", secret_hash="$2b$x")
    await store.set_input_auth(installed.bucket, auth)
    route = await store.route(installed.route.input.id)
    assert route is not None and route.bucket.input_auth == auth
    await store.set_input_auth(installed.bucket, None)
    route = await store.route(installed.route.input.id)
    assert route is not None and route.bucket.input_auth is None
