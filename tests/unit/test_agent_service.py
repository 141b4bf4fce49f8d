"""`relay-agent service`: the unit's text, quoting, the installed files, systemctl calls."""

from __future__ import annotations

import json
import os
import pathlib
import pwd
import stat
import subprocess
from collections.abc import Sequence

import pytest
from click.testing import CliRunner

from relay_agent import cli, cli_service, errors, service

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "agent.toml"
ME = pwd.getpwuid(os.getuid()).pw_name
AGENT = "/opt/stowhook/bin/relay-agent"
HARDENING = [
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "PrivateDevices=yes",
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectControlGroups=yes",
    "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
    "RestrictNamespaces=yes",
    "LockPersonality=yes",
    "SystemCallArchitectures=native",
    "CapabilityBoundingSet=",
    "Restart=always",
    "RestartSec=2",
    "KillSignal=SIGTERM",
    "TimeoutStopSec=45",
    "Type=exec",
    "Environment=STOWHOOK_LOG_FORMAT=json",
    "WantedBy=multi-user.target",
    "After=network-online.target",
    "Wants=network-online.target",
]


def spec(**changes: object) -> service.UnitSpec:
    fields: dict[str, object] = {
        "name": "stowhook-agent",
        "user": "stowhook",
        "group": "stowhook",
        "command": (AGENT,),
        "config": pathlib.PurePosixPath("/etc/stowhook/stowhook-agent.toml"),
    }
    fields.update(changes)
    return service.UnitSpec(**fields)  # type: ignore[arg-type]


def settings_lines(text: str, key: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"{key}=")]


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli.main, ["service", *args])
    return result.exit_code, result.stdout, result.stderr


# -- the unit's text ------------------------------------------------------------------


def test_the_unit_is_hardened() -> None:
    text = service.render_unit(spec())
    lines = text.splitlines()
    for setting in HARDENING:
        assert setting in lines, setting
    assert lines[0] == service.MARKER
    assert "User=stowhook" in lines and "Group=stowhook" in lines
    assert settings_lines(text, "ExecStart") == [
        f"ExecStart={AGENT} run -c /etc/stowhook/stowhook-agent.toml"
    ]
    assert settings_lines(text, "UMask") == ["UMask=0027"]


def test_no_dir_destination_means_no_writable_path() -> None:
    assert settings_lines(service.render_unit(spec()), "ReadWritePaths") == []


def test_read_write_paths_are_exactly_the_dir_destinations() -> None:
    paths = service.config_paths(
        {
            "token_file": "/etc/stowhook/agent.token",
            "subscription": [
                {"bucket": "a", "forward": "http://127.0.0.1:9000/"},
                {"bucket": "b", "dir": "/var/spool/stowhook"},
                {"bucket": "c", "dir": "/srv/exports/"},
                {"bucket": "d", "dir": "/var/spool/stowhook"},  # twice: listed once
            ],
        }
    )
    assert paths.dirs == (
        pathlib.PurePosixPath("/var/spool/stowhook"),
        pathlib.PurePosixPath("/srv/exports"),
    )
    assert paths.reads == (pathlib.PurePosixPath("/etc/stowhook/agent.token"),)
    text = service.render_unit(spec(writable=paths.dirs, reads=paths.reads))
    assert settings_lines(text, "ReadWritePaths") == [
        "ReadWritePaths=/var/spool/stowhook /srv/exports"
    ]
    assert settings_lines(text, "ReadOnlyPaths") == []


def test_the_example_config_gives_its_dir() -> None:
    paths = service.read_config(EXAMPLE)
    assert paths.dirs == (pathlib.PurePosixPath("/var/spool/stowhook"),)
    assert not paths.runs_commands and paths.token_envs == ()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"subscription": [{"bucket": "b", "dir": "spool"}]},
            r"subscription\[0\].dir 'spool' is relative",
        ),
        ({"subscription": [{"bucket": "b", "dir": "~/hooks"}]}, "starts with ~"),
        (
            {"subscription": [{"bucket": "b", "forward": "http://x/", "ca_file": "ca.pem"}]},
            r"subscription\[0\].ca_file 'ca.pem' is relative",
        ),
        ({"token_file": "agent.token"}, "token_file 'agent.token' is relative"),
        ({"ca_file": ""}, "ca_file must be a path"),
        ({"subscription": {"bucket": "b"}}, "array of tables"),
    ],
)
def test_bad_paths_in_the_config_are_refused(data: dict[str, object], message: str) -> None:
    with pytest.raises(errors.ConfigError, match=message):
        service.config_paths(data)


def test_a_path_in_a_home_makes_homes_read_only_not_hidden() -> None:
    text = service.render_unit(spec(writable=(pathlib.PurePosixPath("/home/ops/hooks"),)))
    assert settings_lines(text, "ProtectHome") == ["ProtectHome=read-only"]
    assert settings_lines(text, "ReadWritePaths") == ["ReadWritePaths=/home/ops/hooks"]
    text = service.render_unit(spec(command=("/root/venv/bin/relay-agent",)))
    assert settings_lines(text, "ProtectHome") == ["ProtectHome=read-only"]


@pytest.mark.parametrize(
    ("value", "command", "quoted"),
    [
        ("/var/spool/stowhook", False, "/var/spool/stowhook"),
        ("/var/spool/web hooks", False, '"/var/spool/web hooks"'),
        ("/srv/100%", False, "/srv/100%%"),
        ("/srv/a b%c", False, '"/srv/a b%%c"'),
        ('/srv/say "hi"\\', False, '"/srv/say \\"hi\\"\\\\"'),
        ("/srv/$HOME", False, '"/srv/$HOME"'),
        ("/srv/$HOME", True, '"/srv/$$HOME"'),
        ("/srv/d\u00e9p\u00f4t", False, '"/srv/d\u00e9p\u00f4t"'),
    ],
)
def test_quoting_follows_systemd_rules(value: str, command: bool, quoted: str) -> None:
    assert service.quote(value, command=command) == quoted


@pytest.mark.parametrize("value", ["/srv/a\nExecStartPre=/bin/sh", "/srv/\ttab", "/srv/\udcff"])
def test_what_systemd_cannot_take_is_refused(value: str) -> None:
    with pytest.raises(errors.ConfigError):
        service.quote(value)


def test_quoted_paths_in_the_unit() -> None:
    text = service.render_unit(
        spec(
            command=("/opt/my tools/relay-agent",),
            config=pathlib.PurePosixPath("/etc/stowhook/agent 1.toml"),
            writable=(pathlib.PurePosixPath("/srv/web hooks"), pathlib.PurePosixPath("/srv/x")),
        )
    )
    assert settings_lines(text, "ExecStart") == [
        'ExecStart="/opt/my tools/relay-agent" run -c "/etc/stowhook/agent 1.toml"'
    ]
    assert settings_lines(text, "ReadWritePaths") == ['ReadWritePaths="/srv/web hooks" /srv/x']


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": "agent@x"}, "invalid service name"),
        ({"name": "a/b"}, "invalid service name"),
        ({"user": "bad user"}, "invalid user name"),
        ({"command": ("relay-agent",)}, "absolute path"),
        ({"command": ("/opt/$x/relay-agent",)}, "must not hold a '\\$'"),
        ({"config": pathlib.PurePosixPath("agent.toml")}, "relative"),
    ],
)
def test_bad_unit_specs_are_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(errors.ConfigError, match=message):
        spec(**changes)


def test_the_deploy_example_is_what_install_prints() -> None:
    code, printed, _ = invoke("install", "--print", "-c", str(EXAMPLE), "--executable", AGENT)
    assert code == 0
    example = (ROOT / "deploy" / "relay-agent.service").read_text(encoding="utf-8")
    assert example.endswith(printed)
    assert example[: -len(printed)].startswith("# Example systemd unit")


def test_the_agent_command_is_absolute() -> None:
    command = service.agent_command()
    assert os.path.isabs(command[0])
    assert command == (command[0],) or command[1:] == ("-m", "relay_agent")


# -- files ----------------------------------------------------------------------------


def test_write_atomic_sets_the_mode_and_leaves_no_temporary_file(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "x.toml"
    target.write_text("old")
    target.chmod(0o644)
    service.write_atomic(target, b"new", mode=0o600)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [path.name for path in tmp_path.iterdir()] == ["x.toml"]


def test_systemd_running_looks_for_its_runtime_folder(tmp_path: pathlib.Path) -> None:
    assert not service.systemd_running(tmp_path / "absent")
    assert service.systemd_running(tmp_path)


@pytest.fixture
def dirs(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    return tmp_path / "units", tmp_path / "etc"


@pytest.fixture
def config(tmp_path: pathlib.Path) -> pathlib.Path:
    """A config that `relay-agent run` would take: the example's, with a real token file."""
    token = tmp_path / "agent.token"
    token.write_text("shk_test.not-shown\n")
    token.chmod(0o600)
    text = EXAMPLE.read_text(encoding="utf-8")
    text = text.replace('"/etc/stowhook/agent.token"', f'"{token}"')
    text = text.replace('ca_file = "/etc/stowhook/ca.pem"', "")
    path = tmp_path / "agent.toml"
    path.write_text(text)
    path.chmod(0o644)
    return path


def test_the_agent_takes_the_example_config(config: pathlib.Path) -> None:
    """deploy/agent.toml, with a token file that exists, passes relay_agent.config."""
    assert cli_service.config_refusal(config, service.read_config(config)) is None


def install_args(config: pathlib.Path, dirs: tuple[pathlib.Path, pathlib.Path]) -> list[str]:
    unit_dir, config_dir = dirs
    return [
        "-c",
        str(config),
        "--unit-dir",
        str(unit_dir),
        "--config-dir",
        str(config_dir),
        "--user",
        ME,
    ]


def test_print_writes_nothing(
    config: pathlib.Path, dirs: tuple[pathlib.Path, pathlib.Path]
) -> None:
    code, printed, _ = invoke("install", "--print", *install_args(config, dirs))
    assert code == 0
    assert printed.startswith(service.MARKER)
    assert not dirs[0].exists() and not dirs[1].exists()


def test_install_writes_a_0600_config_and_a_0644_unit(
    config: pathlib.Path, dirs: tuple[pathlib.Path, pathlib.Path]
) -> None:
    unit_dir, config_dir = dirs
    code, output, _ = invoke("install", "--no-start", *install_args(config, dirs))
    assert code == 0, output
    unit, installed = unit_dir / "stowhook-agent.service", config_dir / "stowhook-agent.toml"
    assert stat.S_IMODE(installed.stat().st_mode) == 0o600
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    assert installed.read_bytes() == config.read_bytes()
    assert installed.stat().st_uid == os.getuid()
    _, printed, _ = invoke("install", "--print", *install_args(config, dirs))
    assert unit.read_text(encoding="utf-8") == printed
    assert f"-c {installed}" in printed
    assert "not started (--no-start)" in output
    assert "not-shown" not in output


def test_install_refuses_to_overwrite_without_force(
    config: pathlib.Path, dirs: tuple[pathlib.Path, pathlib.Path]
) -> None:
    assert invoke("install", "--no-start", *install_args(config, dirs))[0] == 0
    unit = dirs[0] / "stowhook-agent.service"
    unit.write_text("edited")
    code, _, errors_out = invoke("install", "--no-start", *install_args(config, dirs))
    assert code == 2
    assert f"{unit} exists: use --force" in errors_out
    assert unit.read_text() == "edited"
    assert invoke("install", "--no-start", "--force", *install_args(config, dirs))[0] == 0
    assert unit.read_text().startswith(service.MARKER)


def test_install_refuses_to_replace_another_config(
    config: pathlib.Path, dirs: tuple[pathlib.Path, pathlib.Path]
) -> None:
    dirs[1].mkdir()
    (dirs[1] / "stowhook-agent.toml").write_text("server = 'other:1'\n")
    code, _, errors_out = invoke("install", "--no-start", *install_args(config, dirs))
    assert code == 2
    assert "stowhook-agent.toml exists" in errors_out
    assert not dirs[0].exists()


def test_install_refuses_an_unknown_user_when_it_would_start(
    config: pathlib.Path,
    dirs: tuple[pathlib.Path, pathlib.Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(service, "SYSTEMD_RUNTIME_DIR", config.parent)
    monkeypatch.setattr(cli_service, "_SYSTEM_UNIT_DIRS", frozenset({dirs[0]}))
    args = [*install_args(config, dirs)[:-1], "no-such-user-stowhook"]
    code, _, errors_out = invoke("install", *args)
    assert code == 2
    assert "user 'no-such-user-stowhook' does not exist" in errors_out
    assert "useradd --system" in errors_out
    assert not dirs[0].exists() and not dirs[1].exists()


def test_install_warns_about_what_will_not_work(
    tmp_path: pathlib.Path, dirs: tuple[pathlib.Path, pathlib.Path]
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        'server = "relay:1"\ntoken_env = "STOWHOOK_TOKEN"\n'
        '[[subscription]]\nbucket = "b"\nexec = "/usr/local/bin/on-hook"\n'
        '[[subscription]]\nbucket = "c"\ndir = "/var/spool/no-such-stowhook"\n'
    )
    code, _, warnings = invoke("install", "--print", *install_args(config, dirs))
    assert code == 0
    assert "$STOWHOOK_TOKEN, which a service does not inherit" in warnings
    assert "exec destinations run inside the service's sandbox" in warnings
    assert "install -d -o" in warnings and "/var/spool/no-such-stowhook" in warnings
    assert "private, empty /tmp" in warnings  # the config dir is under /tmp here


def test_a_config_the_agent_would_refuse_blocks_a_start_but_not_a_print(
    tmp_path: pathlib.Path,
    dirs: tuple[pathlib.Path, pathlib.Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        'server = "relay:1"\ntoken_file = "/nonexistent/agent.token"\n'
        '[[subscription]]\nbucket = "b"\nforward = "http://127.0.0.1:9/"\n'
    )
    code, printed, warnings = invoke("install", "--print", *install_args(config, dirs))
    assert code == 0 and printed.startswith(service.MARKER)
    assert "the agent would refuse this config" in warnings
    assert "cannot read the token file /nonexistent/agent.token" in warnings

    monkeypatch.setattr(service, "SYSTEMD_RUNTIME_DIR", tmp_path)
    monkeypatch.setattr(cli_service, "_SYSTEM_UNIT_DIRS", frozenset({dirs[0]}))
    code, _, errors_out = invoke("install", *install_args(config, dirs))
    assert code == 2
    assert "cannot read the token file" in errors_out and "--no-start" in errors_out
    assert not dirs[0].exists() and not dirs[1].exists()

    code, _, warnings = invoke("install", "--no-start", *install_args(config, dirs))
    assert code == 0 and "cannot read the token file" in warnings
    assert (dirs[0] / "stowhook-agent.service").exists()


def test_print_keeps_log_warnings_off_stdout(
    config: pathlib.Path, dirs: tuple[pathlib.Path, pathlib.Path]
) -> None:
    (config.parent / "agent.token").chmod(0o644)  # relay_agent.config logs a warning
    code, printed, warnings = invoke("install", "--print", *install_args(config, dirs))
    assert code == 0
    assert printed.startswith(service.MARKER)
    assert "token_file_readable" in warnings


def test_token_and_ca_files_may_be_set_per_subscription() -> None:
    paths = service.config_paths(
        {
            "token_env": "TOKEN_A",
            "subscription": [
                {"bucket": "a", "forward": "http://x/", "token_file": "/etc/stowhook/b.token"},
                {"bucket": "b", "forward": "http://x/", "ca_file": "/etc/ssl/relay.pem"},
                {"bucket": "c", "forward": "http://x/", "token_env": "TOKEN_C"},
            ],
        }
    )
    assert [str(path) for path in paths.reads] == ["/etc/stowhook/b.token", "/etc/ssl/relay.pem"]
    assert paths.token_envs == ("TOKEN_A", "TOKEN_C")


def test_writable_adds_folders_for_exec_destinations(
    config: pathlib.Path, dirs: tuple[pathlib.Path, pathlib.Path]
) -> None:
    code, printed, _ = invoke(
        "install", "--print", "--writable", "/srv/reports", *install_args(config, dirs)
    )
    assert code == 0
    assert settings_lines(printed, "ReadWritePaths") == [
        "ReadWritePaths=/var/spool/stowhook /srv/reports"
    ]
    code, _, errors_out = invoke(
        "install", "--print", "--writable", "reports", *install_args(config, dirs)
    )
    assert code == 2 and "--writable 'reports' is relative" in errors_out


def test_a_config_that_is_not_toml_is_refused(
    tmp_path: pathlib.Path, dirs: tuple[pathlib.Path, pathlib.Path]
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("server = \n")
    code, _, errors_out = invoke("install", "--print", *install_args(config, dirs))
    assert code == 2
    assert "is not valid TOML" in errors_out


def test_status_then_uninstall(
    config: pathlib.Path, dirs: tuple[pathlib.Path, pathlib.Path]
) -> None:
    location = ["--unit-dir", str(dirs[0]), "--config-dir", str(dirs[1])]
    code, output, _ = invoke("status", "--json", *location)
    assert code == 0 and json.loads(output)["installed"] is False
    assert invoke("install", "--no-start", *install_args(config, dirs))[0] == 0

    code, output, _ = invoke("status", "--json", *location)
    report = json.loads(output)
    assert report == {
        "name": "stowhook-agent",
        "unit_file": str(dirs[0] / "stowhook-agent.service"),
        "installed": True,
        "generated": True,
        "config_file": str(dirs[1] / "stowhook-agent.toml"),
        "config_exists": True,
        "systemd_running": False,
        "active": None,
        "enabled": None,
    }
    code, output, _ = invoke("status", *location)
    assert "systemd is not running here" in output

    code, output, _ = invoke("uninstall", *location)
    assert code == 0
    assert not (dirs[0] / "stowhook-agent.service").exists()
    assert (dirs[1] / "stowhook-agent.toml").exists()
    code, output, _ = invoke("uninstall", "--purge", *location)
    assert code == 0
    assert not (dirs[1] / "stowhook-agent.toml").exists()
    code, output, _ = invoke("uninstall", "--purge", *location)
    assert code == 0 and "nothing to remove" in output


def test_uninstall_leaves_a_unit_it_did_not_write(dirs: tuple[pathlib.Path, pathlib.Path]) -> None:
    dirs[0].mkdir()
    unit = dirs[0] / "stowhook-agent.service"
    unit.write_text("[Service]\nExecStart=/bin/true\n")
    location = ["--unit-dir", str(dirs[0]), "--config-dir", str(dirs[1])]
    code, _, errors_out = invoke("uninstall", *location)
    assert code == 2 and "was not written by" in errors_out
    assert unit.exists()
    assert invoke("uninstall", "--force", *location)[0] == 0
    assert not unit.exists()


# -- systemctl ------------------------------------------------------------------------


class FakeSystemctl:
    def __init__(self, returncode: int = 0, stdout: str = "") -> None:
        self.calls: list[list[str]] = []
        self.returncode = returncode
        self.stdout = stdout

    def __call__(self, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(args))
        return subprocess.CompletedProcess(args, self.returncode, self.stdout, "boom")


def location(tmp_path: pathlib.Path) -> cli_service.Location:
    return cli_service.Location(
        name="stowhook-agent", unit_dir=tmp_path / "units", config_dir=tmp_path / "etc"
    )


def test_start_reloads_enables_then_restarts(tmp_path: pathlib.Path) -> None:
    fake = FakeSystemctl()
    cli_service.start_service(location(tmp_path), None, systemctl=service.Systemctl(runner=fake))
    assert fake.calls == [
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable", "stowhook-agent.service"],
        ["systemctl", "restart", "stowhook-agent.service"],
    ]


def test_no_start_calls_nothing(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeSystemctl()
    systemctl = service.Systemctl(runner=fake)
    cli_service.start_service(location(tmp_path), "--no-start", systemctl=systemctl)
    assert fake.calls == []
    assert "systemctl enable --now stowhook-agent.service" in capsys.readouterr().out


def test_start_blockers(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    here = location(tmp_path)
    assert cli_service.start_blocker(here, no_start=True) == "--no-start"
    monkeypatch.setattr(service, "SYSTEMD_RUNTIME_DIR", tmp_path / "absent")
    assert cli_service.start_blocker(here, no_start=False) == "systemd is not running here"
    monkeypatch.setattr(service, "SYSTEMD_RUNTIME_DIR", tmp_path)
    assert "does not load units from" in str(cli_service.start_blocker(here, no_start=False))
    system = cli_service.Location(
        name="x", unit_dir=pathlib.Path("/etc/systemd/system"), config_dir=tmp_path
    )
    assert cli_service.start_blocker(system, no_start=False) is None


def test_uninstall_disables_before_removing(tmp_path: pathlib.Path) -> None:
    here = location(tmp_path)
    here.unit_dir.mkdir()
    here.unit_path.write_text(service.render_unit(spec()))
    fake = FakeSystemctl()
    cli_service.uninstall_service(
        here, purge=False, force=False, systemctl=service.Systemctl(runner=fake)
    )
    assert fake.calls == [
        ["systemctl", "disable", "--now", "stowhook-agent.service"],
        ["systemctl", "daemon-reload"],
    ]
    assert not here.unit_path.exists()


def test_status_asks_systemctl(tmp_path: pathlib.Path) -> None:
    fake = FakeSystemctl(returncode=3, stdout="inactive\n")
    report = cli_service.service_status(
        location(tmp_path), systemctl=service.Systemctl(runner=fake)
    )
    assert report.active == "inactive" and report.systemd_running
    assert ["systemctl", "is-active", "stowhook-agent.service"] in fake.calls


def test_systemctl_failures_are_fatal_errors() -> None:
    with pytest.raises(errors.FatalError, match="`systemctl daemon-reload` failed: boom"):
        service.Systemctl(runner=FakeSystemctl(returncode=1))("daemon-reload")

    def missing(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        raise FileNotFoundError(args[0])

    with pytest.raises(errors.FatalError, match="systemctl is not installed"):
        service.Systemctl(runner=missing)("daemon-reload")
