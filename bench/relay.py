"""Stowhook installations for the bench: one template per run, a private copy per scenario.

The template is made once, in this process, through the store's own API (the same calls
`relay-server quickstart`, `bucket create`, `output create` and `token create` make):

  bucket `bench`      one input, the default output: ingest, latency, drain, large bodies
  bucket `fanout`     one input, ten outputs (`default`, `o1` ... `o9`)
  buckets `many0-9`   one input each: the 1,000 agent streams
  one agent token     scoped to every bucket (kept in memory, handed to agents by env)

Each scenario gets a copy: the SQLite file copied, or on PostgreSQL a database cloned
from the template's (`CREATE DATABASE stowhook_bench_<random> TEMPLATE ...`), so no
scenario sees another's rows. `Databases` drops every PostgreSQL database it made.
"""

from __future__ import annotations

import pathlib
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench import procs
from relay_server import auth, crypto
from relay_server.store import database, sql

BUCKET = "bench"
FANOUT = "fanout"
FANOUT_OUTPUTS = ("default", *(f"o{n}" for n in range(1, 10)))
MANY = tuple(f"many{n}" for n in range(10))
BUCKETS = (BUCKET, FANOUT, *MANY)
DB_PREFIX = "stowhook_bench"

# Flags every bench server runs with. --source-rate 0: the load generator is one address
# sending far more than the per-source default (1000/s) allows a single sender.
# --grpc-max-streams-per-token: the 1,000 agent streams share one token.
SERVE_FLAGS = ("--source-rate", "0", "--grpc-max-streams-per-token", "1000")


class Databases:
    """PostgreSQL databases made for this run; `drop_all()` removes every one."""

    def __init__(self) -> None:
        self.made: list[str] = []

    async def create(self, template: str | None = None) -> str:
        from tests import pg  # the test suite's helpers: asyncpg, CREATE/DROP DATABASE

        url = await pg.create_database(DB_PREFIX, template=template)
        self.made.append(url)
        return url

    async def drop_all(self) -> None:
        from tests import pg

        while self.made:
            await pg.drop_database(self.made.pop())


@dataclass(frozen=True, slots=True, kw_only=True)
class Template:
    engine: str  # sqlite | postgres
    folder: pathlib.Path
    database_url: str
    key_file: pathlib.Path
    token: str = field(repr=False)
    inputs: dict[str, str]  # bucket name -> input id
    outputs: dict[str, dict[str, str]]  # bucket name -> output name -> output id


async def make_template(folder: pathlib.Path, engine: str, databases: Databases) -> Template:
    key_file = folder / "stowhook.key"
    crypto.write_new_key_file(key_file)
    if engine == "postgres":
        url = await databases.create()
    else:
        url = f"sqlite:///{folder / 'template.db'}"
    store = sql.SqlStore(database.DatabaseSettings(url=url), crypto.load_key_file(key_file))
    await store.open()
    try:
        await store.migrate()
        inputs, outputs, token = await _populate(store)
    finally:
        await store.close()
    return Template(
        engine=engine,
        folder=folder,
        database_url=url,
        key_file=key_file,
        token=token,
        inputs=inputs,
        outputs=outputs,
    )


async def _populate(
    store: sql.SqlStore,
) -> tuple[dict[str, str], dict[str, dict[str, str]], str]:
    account = await store.create_account("default")
    inputs: dict[str, str] = {}
    outputs: dict[str, dict[str, str]] = {}
    bucket_ids = []
    for name in BUCKETS:
        bucket = await store.create_bucket(account.id, name)
        bucket_ids.append(bucket.id)
        inputs[name] = (await store.create_input(bucket, "bench")).id
        if name == FANOUT:
            for output in FANOUT_OUTPUTS[1:]:
                await store.create_output(bucket, output, ordered=False)
        outputs[name] = {o.name: o.id for o in await store.list_outputs(bucket)}
    key_id, secret = auth.new_token()
    await store.create_token(
        key_id=key_id,
        account_id=account.id,
        name="bench",
        secret_hash=auth.hash_secret(secret),
        bucket_ids=bucket_ids,
    )
    return inputs, outputs, f"{key_id}.{secret}"


@dataclass(kw_only=True)
class Installation:
    """A private copy of the template, with its own ports."""

    template: Template
    folder: pathlib.Path
    database_url: str
    http_port: int = field(default_factory=procs.free_port)
    grpc_port: int = field(default_factory=procs.free_port)

    @classmethod
    async def copy(
        cls, template: Template, folder: pathlib.Path, databases: Databases
    ) -> Installation:
        folder.mkdir(parents=True, exist_ok=True)
        if template.engine == "postgres":
            url = await databases.create(template=database_name(template.database_url))
        else:
            source = pathlib.Path(template.database_url.removeprefix("sqlite:///"))
            target = folder / "relay.db"
            shutil.copyfile(source, target)
            url = f"sqlite:///{target}"
        return cls(template=template, folder=folder, database_url=url)

    def input_url(self, bucket: str = BUCKET) -> str:
        return f"http://127.0.0.1:{self.http_port}/in/{self.template.inputs[bucket]}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def agent_env(self) -> dict[str, str]:
        return {"STOWHOOK_TOKEN": self.template.token}

    def output_id(self, bucket: str = BUCKET, output: str = "default") -> str:
        return self.template.outputs[bucket][output]

    def open_store(self) -> sql.SqlStore:
        """The store of this installation, in this process (open() and close() it)."""
        settings = database.DatabaseSettings(url=self.database_url)
        return sql.SqlStore(settings, crypto.load_key_file(self.template.key_file))

    async def serve(self, group: procs.Group, *extra: str, name: str = "server") -> procs.Child:
        """`relay-server serve` on this installation, once /readyz answers 200."""
        child = await group.start(
            name,
            [
                str(procs.BIN / "relay-server"),
                "--database-url",
                self.database_url,
                "--key-file",
                str(self.template.key_file),
                "--log-format",
                "json",
                "--log-level",
                "warning",
                "serve",
                "--http-listen",
                f"127.0.0.1:{self.http_port}",
                "--grpc-listen",
                self.grpc_address,
                *SERVE_FLAGS,
                *extra,
            ],
        )
        await procs.wait_http(f"http://127.0.0.1:{self.http_port}/readyz", child)
        return child

    async def agent(
        self,
        group: procs.Group,
        forward: str,
        *extra: str,
        bucket: str = BUCKET,
        max_in_flight: int = 64,
        name: str = "agent",
    ) -> procs.Child:
        """`relay-agent run --forward URL` on `bucket`."""
        return await group.start(
            name,
            [
                str(procs.BIN / "relay-agent"),
                "run",
                "--server",
                self.grpc_address,
                "--insecure",
                "--bucket",
                bucket,
                "--forward",
                forward,
                "--max-in-flight",
                str(max_in_flight),
                "--name",
                name,
                "--log-format",
                "json",
                "--log-level",
                "warning",
                *extra,
            ],
            env=self.agent_env,
        )

    async def agent_config(
        self, group: procs.Group, subscriptions: Sequence[str], *, name: str = "agent"
    ) -> procs.Child:
        """`relay-agent run -c FILE`: one stream per [[subscription]] (TOML tables given)."""
        config = self.folder / f"{name}.toml"
        head = [
            f'server = "{self.grpc_address}"',
            'token_env = "STOWHOOK_TOKEN"',
            "insecure = true",
            f'name = "{name}"',
        ]
        config.write_text("\n".join([*head, *subscriptions]) + "\n")
        return await group.start(
            name,
            [
                str(procs.BIN / "relay-agent"),
                "run",
                "-c",
                str(config),
                "--log-format",
                "json",
                "--log-level",
                "warning",
            ],
            env=self.agent_env,
        )


def database_name(url: str) -> str:
    return url.rsplit("/", 1)[1].split("?", 1)[0]
