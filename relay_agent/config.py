"""The agent's TOML configuration file, turned into settings objects.

Only cli.py calls this module, and it is the only place besides cli.py that reads
files (the config file itself and the token files it names).

    server = "relay.example.com:50051"
    token_file = "/etc/stowhook/agent.token"   # or token_env = "NAME", or token = "..."
    ca_file = "/etc/stowhook/ca.pem"           # or insecure = true
    name = "billing-box"

    [[subscription]]
    bucket = "github"                          # or a list: ["github", "gitlab"]
    forward = "http://127.0.0.1:9000/hooks"
    max_in_flight = 8
    timeout = 30

    [[subscription]]
    bucket = "stripe"
    exec = "/usr/local/bin/handle-stripe --verbose"   # or a list: the argv, not split
    timeout = 120

    [[subscription]]
    bucket = "exports"
    dir = "/var/spool/stowhook"
    dir_format = "json"                        # or "raw"

Keys in `SHARED_KEYS` may be set at the top level (a default for every subscription)
and in a subscription (for that one only). Each subscription needs a bucket and exactly
one destination: `forward`, `exec` (with `shell = true` to run it with /bin/sh -c) or
`dir` (with `dir_format`). Relative paths are relative to the config file's directory.
Without token, token_file or token_env anywhere, the token comes from the command line
(`--token`, `STOWHOOK_TOKEN` or `--token-file`).

Errors name the key and the line: tomllib gives line numbers for syntax errors only, so
the line of a key is found by scanning the text for `key =` under the right table header
(`_KeyLines`). That is exact for ordinary files; for keys written in inline tables or
dotted form the error points at the nearest line found, or gives none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import pathlib
import re
import stat
import tomllib
from collections.abc import Iterator, Mapping
from typing import Any

import structlog

from relay_agent import errors, settings

log = structlog.get_logger(__name__)

SUBSCRIPTION = "subscription"
# Allowed at the top level (inherited by every subscription) and in a subscription.
SHARED_KEYS = frozenset(
    {
        "server",
        "token",
        "token_file",
        "token_env",
        "ca_file",
        "insecure",
        "tls_server_name",
        "client_cert",
        "client_key",
        "name",
        "output",
        "max_in_flight",
        "timeout",
        "shutdown_grace",
        "keepalive_time",
        "keepalive_timeout",
    }
)
METRICS_LISTEN = "metrics_listen"  # top level only: one listener per process
SUBSCRIPTION_KEYS = frozenset({"bucket", "forward", "exec", "shell", "dir", "dir_format"})
DESTINATION_KEYS = ("forward", "exec", "dir")
TOKEN_KEYS = ("token", "token_file", "token_env")
_MAX_SECRET_FILE_BYTES = 64 * 1024
_MAX_SECONDS = 1e9  # nobody means a timeout of 30 years: that is a typo


def load(
    path: pathlib.Path, *, environ: Mapping[str, str], fallback_token: str | None = None
) -> settings.AgentConfig:
    """Read and validate a config file; raises ConfigError naming the key and line."""
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise errors.ConfigError(f"cannot read the config file {path}: {reason}") from None
    return parse(
        text,
        source=str(path),
        base_dir=path.parent,
        environ=environ,
        fallback_token=fallback_token,
        private=not mode & (stat.S_IRWXG | stat.S_IRWXO),
    )


def parse(
    text: str,
    *,
    source: str,
    base_dir: pathlib.Path,
    environ: Mapping[str, str],
    fallback_token: str | None = None,
    private: bool = True,
) -> settings.AgentConfig:
    """Validate the text of a config file (`source` names it in messages)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise errors.ConfigError(f"{source}: invalid TOML: {exc}") from None
    reader = _Reader(source, _KeyLines(text), base_dir, environ, fallback_token)
    config = reader.config(data)
    if reader.inline_token and not private:
        log.warning(
            "token_in_readable_file",
            path=source,
            detail="the file holds a token and is readable by group or others: chmod 600",
        )
    return config


@dataclasses.dataclass(frozen=True, slots=True)
class _Table:
    """One table of the file: the top level, or the n-th [[subscription]]."""

    section: tuple[str, int] | None  # None: the top level
    values: Mapping[str, Any]

    @property
    def prefix(self) -> str:
        return "" if self.section is None else f"{self.section[0]}[{self.section[1]}]."

    @property
    def label(self) -> str:
        return "the top level" if self.section is None else self.prefix[:-1]


class _KeyLines:
    """Line numbers of `key =` lines and of table headers, by a scan of the text."""

    _HEADER = re.compile(r"\s*(\[\[?)\s*([^\]]*?)\s*\]")
    _KEY = re.compile(r"""\s*("[^"]*"|'[^']*'|[A-Za-z0-9_-]+)\s*[=.]""")

    def __init__(self, text: str) -> None:
        self._keys: dict[tuple[tuple[str, int] | None, str], int] = {}
        self._headers: dict[tuple[str, int] | None, int] = {}
        self._scan(text)

    def line(self, section: tuple[str, int] | None, key: str | None) -> int | None:
        if key is not None and (section, key) in self._keys:
            return self._keys[(section, key)]
        if section is not None and section in self._headers:
            return self._headers[section]
        if section is not None and key is None:
            return self._keys.get((None, section[0]))  # an inline array of tables
        return None

    def _scan(self, text: str) -> None:
        section: tuple[str, int] | None = None
        counts: dict[str, int] = {}
        in_multiline = False  # inside a multi-line string: nothing there is a key
        for number, line in enumerate(text.splitlines(), start=1):
            toggles = (line.count('"""') + line.count("'''")) % 2 == 1
            if in_multiline:
                in_multiline = not toggles
                continue
            section = self._scan_line(line, number, section, counts)
            in_multiline = toggles

    def _scan_line(
        self,
        line: str,
        number: int,
        section: tuple[str, int] | None,
        counts: dict[str, int],
    ) -> tuple[str, int] | None:
        if header := self._HEADER.match(line):
            name = header.group(2).strip("\"'")
            index = counts.get(name, -1) + 1 if header.group(1) == "[[" else 0
            counts[name] = index
            self._headers.setdefault((name, index), number)
            self._keys.setdefault((None, name), number)
            return (name, index)
        if key := self._KEY.match(line):
            self._keys.setdefault((section, key.group(1).strip("\"'")), number)
        return section


class _Reader:
    """Turns the parsed document into settings, raising at the first error found."""

    def __init__(
        self,
        source: str,
        lines: _KeyLines,
        base_dir: pathlib.Path,
        environ: Mapping[str, str],
        fallback_token: str | None,
    ) -> None:
        self._source = source
        self._lines = lines
        self._base_dir = base_dir
        self._environ = environ
        self._fallback_token = fallback_token
        self.inline_token = False

    def config(self, data: dict[str, Any]) -> settings.AgentConfig:
        top = _Table(None, data)
        self._check_keys(top, SHARED_KEYS | {SUBSCRIPTION, METRICS_LISTEN})
        subscriptions = tuple(
            self._subscription(top, table) for table in self._subscription_tables(data)
        )
        self._check_buckets_unique(subscriptions)
        metrics_listen = data.get(METRICS_LISTEN)
        if metrics_listen is not None and not isinstance(metrics_listen, str):
            raise self._error(None, METRICS_LISTEN, 'must be a string like "127.0.0.1:9464"')
        with self._at(None, METRICS_LISTEN if metrics_listen is not None else None):
            return settings.AgentConfig(subscriptions=subscriptions, metrics_listen=metrics_listen)

    def _subscription_tables(self, data: dict[str, Any]) -> Iterator[_Table]:
        raw = data.get(SUBSCRIPTION)
        if raw is None:
            raise self._locate(None, None, "no [[subscription]]: configure at least one")
        if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
            raise self._error(
                None, SUBSCRIPTION, "must be an array of tables: write each as [[subscription]]"
            )
        if not raw:
            raise self._locate(None, SUBSCRIPTION, "configure at least one [[subscription]]")
        for index, values in enumerate(raw):
            yield _Table((SUBSCRIPTION, index), values)

    def _subscription(self, top: _Table, table: _Table) -> settings.Subscription:
        self._check_keys(table, SHARED_KEYS | SUBSCRIPTION_KEYS)
        merged = _Merged(top, table)
        buckets = self._buckets(table)
        destination = self._destination(merged, table)
        agent_settings = self._agent(merged, table, buckets)
        return settings.Subscription(
            agent=agent_settings, destination=destination, label=table.label
        )

    def _check_buckets_unique(self, subscriptions: tuple[settings.Subscription, ...]) -> None:
        owner: dict[tuple[str, str], str] = {}
        for index, subscription in enumerate(subscriptions):
            output = subscription.agent.output
            for bucket in subscription.agent.buckets:
                if (bucket, output) in owner:
                    raise self._error(
                        (SUBSCRIPTION, index),
                        "bucket",
                        f"{bucket!r} (output {output!r}) is already in "
                        f"{owner[bucket, output]}: give each bucket to one subscription",
                    )
                owner[bucket, output] = subscription.label

    # ---- the connection and the stream ----------------------------------------------

    def _agent(
        self, merged: _Merged, table: _Table, buckets: tuple[str, ...]
    ) -> settings.AgentSettings:
        server = self._required_string(merged, "server")
        with self._at(merged.origin("server"), "server"):
            settings.server_list(server)
        extra: dict[str, Any] = {}
        if (name := self._string(merged, "name")) is not None:
            extra["agent_name"] = name
        if (output := self._string(merged, "output")) is not None:
            extra["output"] = output
        if (ca_file := self._string(merged, "ca_file")) is not None:
            extra["ca_file"] = self._path(ca_file)
        for key in ("client_cert", "client_key"):
            if (path := self._string(merged, key)) is not None:
                extra[key] = self._path(path)
        if (grace := self._number(merged, "shutdown_grace", minimum=0.0)) is not None:
            extra["shutdown_grace_s"] = grace
        for key in ("keepalive_time", "keepalive_timeout"):
            if (seconds := self._number(merged, key, minimum=0.0, exclusive=True)) is not None:
                extra[f"{key}_ms"] = settings.whole_ms(seconds)
        limit = settings.MAX_IN_FLIGHT_LIMIT
        if (max_in_flight := self._integer(merged, "max_in_flight", 1, limit)) is not None:
            extra["max_in_flight"] = max_in_flight
        token = self._token(merged)
        with self._at(table.section, None):
            return settings.AgentSettings(
                server=server,
                token=token,
                buckets=buckets,
                insecure=self._bool(merged, "insecure") or False,
                tls_server_name=self._string(merged, "tls_server_name"),
                **extra,
            )

    def _buckets(self, table: _Table) -> tuple[str, ...]:
        value = table.values.get("bucket")
        if value is None:
            raise self._locate(table.section, None, f'{table.label} needs bucket = "NAME"')
        names = [value] if isinstance(value, str) else value
        if not (isinstance(names, list) and names and all(_is_name(name) for name in names)):
            raise self._error(
                table.section, "bucket", "must be a bucket name or a non-empty list of names"
            )
        if len(set(names)) != len(names):
            raise self._error(table.section, "bucket", "lists the same bucket twice")
        return tuple(names)

    def _token(self, merged: _Merged) -> str:
        """The subscription's own token source if it has one, else the top level's."""
        given = [key for key in TOKEN_KEYS if merged.defined_here(key)]
        if not given:
            given = [key for key in TOKEN_KEYS if merged.defined_at_top(key)]
        if len(given) > 1:
            raise self._error(
                merged.origin(given[1]), given[1], f"and {given[0]} are both set: give one"
            )
        if not given:
            if self._fallback_token:
                return self._fallback_token
            raise self._locate(
                None,
                None,
                "no agent token: set token_file, token_env or token, "
                "or give --token / STOWHOOK_TOKEN / --token-file",
            )
        key = given[0]
        raw = self._required_string(merged, key)
        with self._at(merged.origin(key), key):
            token = self._resolve_token(key, raw)
            settings.check_token(token)
        return token

    def _resolve_token(self, key: str, raw: str) -> str:
        if key == "token":
            self.inline_token = True
            return raw
        if key == "token_env":
            value = self._environ.get(raw, "").strip()
            if not value:
                raise errors.ConfigError(f"the environment variable {raw} is not set or empty")
            return value
        return _read_secret_file(self._path(raw))

    # ---- the destination ------------------------------------------------------------

    def _destination(self, merged: _Merged, table: _Table) -> settings.DestinationSettings:
        given = [key for key in table.values if key in DESTINATION_KEYS]  # in file order
        if len(given) != 1:
            problem = "has several destinations" if given else "needs a destination"
            raise self._locate(
                table.section,
                given[1] if len(given) > 1 else None,
                f"{table.label} {problem}: give exactly one of forward, exec or dir",
            )
        self._check_options_match(table, given[0])
        if given[0] == "forward":
            return self._forward(merged, table)
        if given[0] == "exec":
            return self._exec(merged, table)
        return self._dir(merged, table)

    def _check_options_match(self, table: _Table, kind: str) -> None:
        belongs = {"shell": "exec", "dir_format": "dir"}
        for key, owner in belongs.items():
            if key in table.values and kind != owner:
                raise self._error(table.section, key, f"applies only to {owner} destinations")
        if kind == "dir" and "timeout" in table.values:
            raise self._error(
                table.section, "timeout", "does not apply to dir destinations (writes are local)"
            )

    def _forward(self, merged: _Merged, table: _Table) -> settings.HttpDestinationSettings:
        url = self._required_string(merged, "forward")
        timeout = self._number(merged, "timeout", minimum=0.0, exclusive=True)
        with self._at(table.section, "forward"):
            return settings.HttpDestinationSettings(
                url=url, timeout_s=timeout or settings.DEFAULT_HTTP_TIMEOUT_S
            )

    def _exec(self, merged: _Merged, table: _Table) -> settings.ExecDestinationSettings:
        value = table.values["exec"]
        shell = self._bool(merged, "shell") or False
        timeout = self._number(merged, "timeout", minimum=0.0, exclusive=True)
        with self._at(table.section, "exec"):
            if isinstance(value, str):
                argv = settings.exec_argv(value, shell=shell)
            elif isinstance(value, list) and value and all(isinstance(a, str) for a in value):
                if shell:
                    raise errors.ConfigError("shell = true needs exec as one string")
                argv = tuple(value)
            else:
                raise errors.ConfigError("must be a command string or a list of arguments")
            return settings.ExecDestinationSettings(
                argv=argv, timeout_s=timeout or settings.DEFAULT_EXEC_TIMEOUT_S
            )

    def _dir(self, merged: _Merged, table: _Table) -> settings.DirDestinationSettings:
        path = self._required_string(merged, "dir")
        fmt = self._string(merged, "dir_format") or settings.DirFormat.JSON.value
        choices = ", ".join(f'"{item.value}"' for item in settings.DirFormat)
        if fmt not in {item.value for item in settings.DirFormat}:
            raise self._error(table.section, "dir_format", f"must be one of {choices}")
        with self._at(table.section, "dir"):
            return settings.DirDestinationSettings(
                path=self._path(path), format=settings.DirFormat(fmt)
            )

    # ---- typed values ---------------------------------------------------------------

    def _required_string(self, merged: _Merged, key: str) -> str:
        value = self._string(merged, key)
        if value is None:
            label = merged.table.label
            where = f"at the top level or in {label}" if key in SHARED_KEYS else f"in {label}"
            raise self._locate(merged.table.section, None, f"missing the key '{key}' ({where})")
        return value

    def _string(self, merged: _Merged, key: str) -> str | None:
        value = merged.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self._error(merged.origin(key), key, "must be a non-empty string")
        return value

    def _bool(self, merged: _Merged, key: str) -> bool | None:
        value = merged.get(key)
        if value is not None and not isinstance(value, bool):
            raise self._error(merged.origin(key), key, "must be true or false")
        return value

    def _integer(self, merged: _Merged, key: str, low: int, high: int) -> int | None:
        value = merged.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self._error(
                merged.origin(key), key, f"must be an integer from {low} to {high}, not {value!r}"
            )
        return value

    def _number(
        self, merged: _Merged, key: str, *, minimum: float, exclusive: bool = False
    ) -> float | None:
        value = merged.get(key)
        if value is None:
            return None
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        above = is_number and (value > minimum or (value == minimum and not exclusive))
        if above and value < _MAX_SECONDS:
            return float(value)
        relation = ">" if exclusive else ">="
        raise self._error(
            merged.origin(key), key, f"must be a number of seconds {relation} {minimum:g}"
        )

    def _path(self, value: str) -> pathlib.Path:
        return self._base_dir / pathlib.Path(value).expanduser()

    # ---- errors ---------------------------------------------------------------------

    def _check_keys(self, table: _Table, allowed: frozenset[str]) -> None:
        for key in table.values:
            if key in allowed:
                continue
            message = f"unknown key '{key}' in {table.label}"
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            if close:
                message += f" (did you mean '{close[0]}'?)"
            elif table.section is None and key in SUBSCRIPTION_KEYS:
                message += " (it belongs in a [[subscription]])"
            raise self._locate(table.section, key, message)

    def _error(self, section: tuple[str, int] | None, key: str, problem: str) -> _LocatedError:
        """`<file> line N: subscription[1].key <problem>`."""
        return self._locate(section, key, f"{_qualified(section, key)} {problem}")

    def _locate(
        self, section: tuple[str, int] | None, key: str | None, message: str
    ) -> _LocatedError:
        line = self._lines.line(section, key)
        where = f"{self._source} line {line}" if line is not None else self._source
        return _LocatedError(f"{where}: {message}")

    @contextlib.contextmanager
    def _at(self, section: tuple[str, int] | None, key: str | None) -> Iterator[None]:
        """A ConfigError from a settings check gets the key and its line in front."""
        try:
            yield
        except _LocatedError:
            raise
        except errors.ConfigError as exc:
            name = _qualified(section, key) if key else _qualified(section, None)
            message = f"{name}: {exc}" if name else str(exc)
            raise self._locate(section, key, message) from None


class _LocatedError(errors.ConfigError):
    """A configuration error that already names its file, line and key."""


def _qualified(section: tuple[str, int] | None, key: str | None) -> str:
    """subscription[1].timeout, or just the key at the top level."""
    table = "" if section is None else f"{section[0]}[{section[1]}]"
    if key is None:
        return table
    return f"{table}.{key}" if table else key


class _Merged:
    """A subscription's values over the top level's (for the keys both may hold)."""

    def __init__(self, top: _Table, table: _Table) -> None:
        self.top = top
        self.table = table

    def get(self, key: str) -> Any:
        if key in self.table.values:
            return self.table.values[key]
        if key in SHARED_KEYS:
            return self.top.values.get(key)
        return None

    def origin(self, key: str) -> tuple[str, int] | None:
        """The section the value of `key` comes from."""
        return self.table.section if key in self.table.values else self.top.section

    def defined_here(self, key: str) -> bool:
        return key in self.table.values

    def defined_at_top(self, key: str) -> bool:
        return key in self.top.values


def _is_name(value: object) -> bool:
    return isinstance(value, str) and bool(value) and value == value.strip()


def _read_secret_file(path: pathlib.Path) -> str:
    try:
        with path.open("rb") as file:
            raw = file.read(_MAX_SECRET_FILE_BYTES + 1)
            mode = path.stat().st_mode
    except OSError as exc:
        raise errors.ConfigError(f"cannot read the token file {path}: {exc.strerror}") from None
    if len(raw) > _MAX_SECRET_FILE_BYTES:
        raise errors.ConfigError(f"the token file {path} is too large to hold a token")
    try:
        token = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise errors.ConfigError(f"the token file {path} is not UTF-8 text") from None
    if not token:
        raise errors.ConfigError(f"the token file {path} is empty")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "token_file_readable", path=str(path), detail="readable by group or others: chmod 600"
        )
    return token
