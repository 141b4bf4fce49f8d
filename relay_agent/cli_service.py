"""`relay-agent service install|uninstall|status`: the agent as a systemd service.

install copies the agent config to <config-dir>/<name>.toml (mode 0600, owned by the
service user when run as root), writes <unit-dir>/<name>.service (mode 0644), then runs
`systemctl daemon-reload`, `enable` and `restart` (a start, or a restart on the new
config after --force), unless --no-start is given, systemd is not running here, or the
unit folder is not one systemd reads. It creates no user and no folder outside the two
it writes to: it says what to run instead.

Exit codes as for `run`: 2 bad input or a refusal (nothing was changed), 1 anything else.
"""

from __future__ import annotations

import dataclasses
import grp
import json
import os
import pathlib
import pwd
import shlex
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click

from relay_agent import config, errors, service
from relay_agent import logging as agent_logging

EXIT_FATAL = 1
EXIT_CONFIG = 2

# Where systemd loads system units from; units written elsewhere are not started.
_SYSTEM_UNIT_DIRS = frozenset(
    pathlib.Path(path)
    for path in (
        "/etc/systemd/system",
        "/run/systemd/system",
        "/usr/local/lib/systemd/system",
        "/usr/lib/systemd/system",
        "/lib/systemd/system",
    )
)

F = TypeVar("F", bound=Callable[..., Any])
# Stands in for a token that only the service's environment will hold.
_PLACEHOLDER_TOKEN = "placeholder.token"


def register(main: click.Group) -> None:
    """Add the `service` group to the relay-agent command."""
    main.add_command(service_group)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Location:
    """Where one installed service lives."""

    name: str
    unit_dir: pathlib.Path
    config_dir: pathlib.Path

    def __post_init__(self) -> None:
        service.check_unit_name(self.name)

    @property
    def unit(self) -> str:
        return f"{self.name}.service"

    @property
    def unit_path(self) -> pathlib.Path:
        return self.unit_dir / self.unit

    @property
    def config_path(self) -> pathlib.Path:
        return self.config_dir / f"{self.name}.toml"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Account:
    """The service user, as this machine knows it."""

    user: str
    group: str
    uid: int
    gid: int


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Status:
    name: str
    unit_file: str
    installed: bool
    generated: bool  # written by `service install`
    config_file: str
    config_exists: bool
    systemd_running: bool
    active: str | None  # `systemctl is-active`, when systemd runs here
    enabled: str | None  # `systemctl is-enabled`, when systemd runs here


@click.group("service")
def service_group() -> None:
    """Run the agent as a systemd service: install, uninstall, status."""
    # Warnings from reading the config (a token file others can read) go to stderr, so
    # that `install --print` prints nothing but the unit on stdout.
    agent_logging.configure("console", "warning")


def _location_options(func: F) -> F:
    options = [
        click.option(
            "--name",
            default=service.DEFAULT_NAME,
            show_default=True,
            help="Service name: <name>.service and <name>.toml.",
        ),
        click.option(
            "--unit-dir",
            type=click.Path(file_okay=False, path_type=pathlib.Path),
            default=service.DEFAULT_UNIT_DIR,
            show_default=True,
            help="Folder of the unit file.",
        ),
        click.option(
            "--config-dir",
            type=click.Path(file_okay=False, path_type=pathlib.Path),
            default=service.DEFAULT_CONFIG_DIR,
            show_default=True,
            help="Folder of the installed config file.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _location(name: str, unit_dir: pathlib.Path, config_dir: pathlib.Path) -> Location:
    return Location(
        name=name,
        unit_dir=pathlib.Path(os.path.abspath(unit_dir)),
        config_dir=pathlib.Path(os.path.abspath(config_dir)),
    )


@service_group.command()
@click.option(
    "-c",
    "--config",
    "source",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
    help="The agent config file (TOML) to install; it is copied.",
)
@_location_options
@click.option(
    "--user",
    default=service.DEFAULT_USER,
    show_default=True,
    help="User the service runs as. Not created: see `useradd --system`.",
)
@click.option(
    "--writable",
    multiple=True,
    metavar="PATH",
    help="Another folder the service may write to (for exec destinations); repeatable.",
)
@click.option(
    "--executable",
    metavar="PATH",
    help="The relay-agent the service runs [default: this one].",
)
@click.option("--print", "print_only", is_flag=True, help="Print the unit; write nothing.")
@click.option("--no-start", is_flag=True, help="Write the files but do not enable or start.")
@click.option("--force", is_flag=True, help="Replace an existing unit and config.")
def install(**options: Any) -> None:
    """Install the agent as a hardened systemd service and start it."""
    _guard(lambda: _install(**options))


@service_group.command()
@_location_options
@click.option("--purge", is_flag=True, help="Also delete the installed config file.")
@click.option("--force", is_flag=True, help="Remove a unit that `install` did not write.")
def uninstall(name: str, unit_dir: pathlib.Path, config_dir: pathlib.Path, **options: Any) -> None:
    """Stop and disable the service, then delete its unit (and config with --purge)."""

    def remove() -> None:
        location = _location(name, unit_dir, config_dir)
        uninstall_service(location, systemctl=_control(location), **options)

    _guard(remove)


@service_group.command()
@_location_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
def status(name: str, unit_dir: pathlib.Path, config_dir: pathlib.Path, as_json: bool) -> None:
    """Whether the service is installed and running, and where its files are."""

    def show() -> None:
        report = service_status(
            _location(name, unit_dir, config_dir), systemctl=_systemctl_if_running()
        )
        _print_status(report, as_json=as_json)

    _guard(show)


def _install(
    *,
    source: pathlib.Path,
    name: str,
    unit_dir: pathlib.Path,
    config_dir: pathlib.Path,
    user: str,
    writable: tuple[str, ...],
    executable: str | None,
    print_only: bool,
    no_start: bool,
    force: bool,
) -> None:
    location = _location(name, unit_dir, config_dir)
    paths = service.read_config(source)
    account = lookup_account(user)
    spec = unit_spec(location, user, account, paths, writable, executable)
    text = service.render_unit(spec)
    blocker = "--print" if print_only else start_blocker(location, no_start=no_start)
    check_before_writing(source, spec, paths, account, location, starting=blocker is None)
    if print_only:
        click.echo(text, nl=False)
        return
    write_files(source, location, text, owner=_file_owner(account), force=force)
    start_service(location, blocker, systemctl=service.Systemctl())


def check_before_writing(
    source: pathlib.Path,
    spec: service.UnitSpec,
    paths: service.ConfigPaths,
    account: Account | None,
    location: Location,
    *,
    starting: bool,
) -> None:
    """Refuse what would make a service that is about to start fail at once; warn about
    everything else (it may be fixed before the service starts)."""
    refusal = config_refusal(source, paths)
    if starting and account is None:
        raise errors.ConfigError(
            f"user {spec.user!r} does not exist: create it first ({_useradd(spec.user)}), "
            "or install with --no-start"
        )
    if starting and refusal is not None:
        raise errors.ConfigError(f"{refusal} (fix it, or install with --no-start)")
    if refusal is not None:
        click.echo(f"warning: the agent would refuse this config: {refusal}", err=True)
    # After a refusal, a missing token file would be reported twice.
    for warning in install_warnings(spec, paths, account, location, reads=refusal is None):
        click.echo(f"warning: {warning}", err=True)


def config_refusal(source: pathlib.Path, paths: service.ConfigPaths) -> str | None:
    """What `relay-agent run -c` would say about the config here, or None if it takes it.

    The environment variables that hold tokens get a placeholder: the service's
    environment is not the one of whoever runs `install`.
    """
    environ = {name: _PLACEHOLDER_TOKEN for name in paths.token_envs}
    try:
        config.load(source, environ=environ)
    except errors.ConfigError as exc:
        return str(exc)
    return None


def lookup_account(user: str) -> Account | None:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return None
    try:
        group = grp.getgrgid(entry.pw_gid).gr_name
    except KeyError:
        group = str(entry.pw_gid)
    return Account(user=user, group=group, uid=entry.pw_uid, gid=entry.pw_gid)


def unit_spec(
    location: Location,
    user: str,
    account: Account | None,
    paths: service.ConfigPaths,
    writable: tuple[str, ...],
    executable: str | None,
) -> service.UnitSpec:
    extra = [pathlib.PurePosixPath(os.path.normpath(path)) for path in writable]
    for path in extra:
        service.check_absolute(path, "--writable")
    command = (os.path.normpath(executable),) if executable else service.agent_command()
    return service.UnitSpec(
        name=location.name,
        user=user,
        group=account.group if account else user,
        command=command,
        config=pathlib.PurePosixPath(location.config_path),
        writable=service.unique([*paths.dirs, *extra]),
        reads=paths.reads,
    )


def install_warnings(
    spec: service.UnitSpec,
    paths: service.ConfigPaths,
    account: Account | None,
    location: Location,
    *,
    reads: bool = True,
) -> Iterator[str]:
    """What will keep the installed service from working, and what to do about it.
    With `reads`, also the token and CA files named in the config that are missing."""
    if account is None:
        yield (
            f"user {spec.user!r} does not exist: create it ({_useradd(spec.user)}), "
            f"then `chown {spec.user}: {shlex.quote(str(location.config_path))}`"
        )
    for variable in paths.token_envs:
        yield (
            f"the config takes the token from ${variable}, which a service does not "
            f"inherit: set it with `systemctl edit {spec.name}` (Environment=), "
            "or use token_file"
        )
    if paths.runs_commands:
        yield (
            "exec destinations run inside the service's sandbox (read-only system, private "
            "/tmp): give the folders they write to with --writable"
        )
    yield from _missing_path_warnings(spec, paths.reads if reads else ())
    yield from _hidden_path_warnings(spec)


def _missing_path_warnings(
    spec: service.UnitSpec, reads: tuple[pathlib.PurePosixPath, ...]
) -> Iterator[str]:
    executable = pathlib.Path(spec.command[0])
    if not executable.is_file():
        yield f"{executable} does not exist here: the service will fail to start"
    for folder in spec.writable:
        if not pathlib.Path(folder).is_dir():
            yield (
                f"{folder} does not exist: create it before the service starts, or the start "
                f"fails (status 226/NAMESPACE): install -d -o {spec.user} -g {spec.group} "
                f"-m 0750 {shlex.quote(str(folder))}"
            )
    for path in reads:
        if not pathlib.Path(path).exists():
            yield f"{path}, named in the config, does not exist yet"


def _hidden_path_warnings(spec: service.UnitSpec) -> Iterator[str]:
    named = [pathlib.PurePosixPath(spec.command[0]), spec.config, *spec.reads, *spec.writable]
    for path in named:
        if service.hidden_by(path) == "PrivateTmp=":
            yield f"the service will not see {path}: it gets a private, empty /tmp (PrivateTmp=)"


def _useradd(user: str) -> str:
    return f"useradd --system --user-group --no-create-home --shell /usr/sbin/nologin {user}"


def _file_owner(account: Account | None) -> tuple[int, int] | None:
    """chown the config to the service user only when we can (as root) and it exists."""
    if account is None or os.geteuid() != 0:
        return None
    return account.uid, account.gid


def write_files(
    source: pathlib.Path,
    location: Location,
    unit_text: str,
    *,
    owner: tuple[int, int] | None,
    force: bool,
) -> None:
    """The config first, so the unit never names a config that is not there yet."""
    if not force:
        _refuse_overwrite(source, location)
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise errors.ConfigError(f"cannot read {source}: {exc.strerror}") from None
    _write(location.config_path, data, mode=service.CONFIG_MODE, owner=owner)
    click.echo(f"wrote {location.config_path} (mode 0600)")
    _write(location.unit_path, unit_text.encode("utf-8"), mode=service.UNIT_MODE, owner=None)
    click.echo(f"wrote {location.unit_path}")


def _refuse_overwrite(source: pathlib.Path, location: Location) -> None:
    if location.unit_path.exists():
        raise errors.ConfigError(f"{location.unit_path} exists: use --force to replace it")
    installed = location.config_path
    if installed.exists() and not _same_file(installed, source):
        raise errors.ConfigError(f"{installed} exists: use --force to replace it")


def _same_file(one: pathlib.Path, other: pathlib.Path) -> bool:
    try:
        return one.samefile(other)
    except OSError:
        return False


def _write(path: pathlib.Path, data: bytes, *, mode: int, owner: tuple[int, int] | None) -> None:
    try:
        path.parent.mkdir(mode=service.DIR_MODE, parents=True, exist_ok=True)
        service.write_atomic(path, data, mode=mode, owner=owner)
    except OSError as exc:
        raise errors.FatalError(
            f"cannot write {path}: {exc.strerror} (run as root, or choose other folders "
            "with --unit-dir and --config-dir)"
        ) from None


def start_blocker(location: Location, *, no_start: bool) -> str | None:
    """Why the service will not be enabled and started now, or None if it will be."""
    if no_start:
        return "--no-start"
    if not service.systemd_running():
        return "systemd is not running here"
    if location.unit_dir not in _SYSTEM_UNIT_DIRS:
        return f"systemd does not load units from {location.unit_dir}"
    return None


def start_service(location: Location, blocker: str | None, *, systemctl: service.Systemctl) -> None:
    if blocker is not None:
        click.echo(
            f"not started ({blocker}); to start it on a machine run by systemd: "
            f"systemctl daemon-reload && systemctl enable --now {location.unit}"
        )
        return
    # restart, not `enable --now`: after --force the agent may be running with the old
    # config, and --now would leave it so. A restart drains in-flight work first.
    systemctl("daemon-reload")
    systemctl("enable", location.unit)
    systemctl("restart", location.unit)
    click.echo(f"enabled and started {location.unit}: journalctl -u {location.unit} -f")


def _control(location: Location) -> service.Systemctl | None:
    """systemctl, when it can act on units in `location`."""
    if start_blocker(location, no_start=False) is None:
        return service.Systemctl()
    return None


def _systemctl_if_running() -> service.Systemctl | None:
    return service.Systemctl() if service.systemd_running() else None


def uninstall_service(
    location: Location, *, purge: bool, force: bool, systemctl: service.Systemctl | None
) -> None:
    """Stop and disable (when systemd runs), delete the unit, and the config with purge."""
    removed: list[pathlib.Path] = []
    if location.unit_path.exists():
        if not force and not generated(location.unit_path):
            raise errors.ConfigError(
                f"{location.unit_path} was not written by `relay-agent service install`: "
                "use --force to remove it anyway"
            )
        if systemctl is not None:
            systemctl("disable", "--now", location.unit)
        _remove(location.unit_path)
        removed.append(location.unit_path)
        if systemctl is not None:
            systemctl("daemon-reload")
    if purge and location.config_path.exists():
        _remove(location.config_path)
        removed.append(location.config_path)
    for path in removed:
        click.echo(f"removed {path}")
    if not removed:
        click.echo(f"nothing to remove: {location.unit_path} does not exist")
    elif systemctl is None and location.unit_path in removed:
        click.echo(
            f"systemd was not told (not running here, or it does not read {location.unit_dir})"
        )


def _remove(path: pathlib.Path) -> None:
    try:
        path.unlink()
        service.fsync_dir(path.parent)
    except OSError as exc:
        raise errors.FatalError(f"cannot remove {path}: {exc.strerror}") from None


def generated(unit_path: pathlib.Path) -> bool:
    """Whether `install` wrote this unit: the marker is in its leading comments."""
    try:
        with unit_path.open(encoding="utf-8", errors="replace") as file:
            for line in file:
                if not line.startswith("#"):
                    return False
                if line.rstrip("\n") == service.MARKER:
                    return True
    except OSError:
        pass
    return False


def service_status(location: Location, *, systemctl: service.Systemctl | None) -> Status:
    installed = location.unit_path.is_file()
    return Status(
        name=location.name,
        unit_file=str(location.unit_path),
        installed=installed,
        generated=installed and generated(location.unit_path),
        config_file=str(location.config_path),
        config_exists=location.config_path.is_file(),
        systemd_running=systemctl is not None,
        active=systemctl("is-active", location.unit, check=False) if systemctl else None,
        enabled=systemctl("is-enabled", location.unit, check=False) if systemctl else None,
    )


def _print_status(report: Status, *, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(report)))
        return
    unit = report.unit_file if report.installed else f"not installed ({report.unit_file} absent)"
    config_file = report.config_file if report.config_exists else f"{report.config_file} (absent)"
    running = (
        f"{report.active or 'unknown'}, {report.enabled or 'unknown'} at boot"
        if report.systemd_running
        else "unknown: systemd is not running here"
    )
    for label, value in (("service", report.name), ("unit", unit), ("config", config_file)):
        click.echo(f"{label:8} {value}")
    click.echo(f"{'running':8} {running}")


def _guard(action: Callable[[], None]) -> None:
    try:
        action()
    except errors.ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    except errors.AgentError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FATAL)
