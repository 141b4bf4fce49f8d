"""The real `relay-agent service` command: its unit passes `systemd-analyze verify`, and
install, status and uninstall work on real files.

`systemd-analyze verify` needs no running systemd: it loads the unit file offline, checks
every setting, and checks that ExecStart's program exists and is executable. It exits 0
on some problems (an unknown setting is only a warning), so the tests also require that
it says nothing about our unit, and a control test shows that it does when there is
something to say. Nothing here calls systemctl: the folders are temporary, which
`install` never starts from.
"""

from __future__ import annotations

import json
import os
import pathlib
import pwd
import shutil
import stat
import subprocess

import pytest

from tests.acceptance import harness

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "agent.toml"
AGENT = harness.BIN / "relay-agent"
# A user that exists here, so that nothing depends on a `stowhook` user on the test box.
ME = pwd.getpwuid(os.getuid()).pw_name
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is not installed here (it comes with systemd); "
    "the unit cannot be verified on this machine",
)


def relay_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(AGENT), "service", *args], capture_output=True, text=True, timeout=60, check=False
    )


def verify(unit: pathlib.Path) -> tuple[int, list[str]]:
    """systemd-analyze verify's exit status, and what it said about `unit`."""
    assert SYSTEMD_ANALYZE is not None
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    said = (done.stdout + done.stderr).splitlines()
    return done.returncode, [line for line in said if unit.name in line]


def printed_unit(tmp_path: pathlib.Path, config: pathlib.Path, *extra: str) -> pathlib.Path:
    done = relay_agent("install", "--print", "-c", str(config), "--user", ME, *extra)
    assert done.returncode == 0, done.stderr
    unit = tmp_path / "stowhook-agent.service"
    unit.write_text(done.stdout, encoding="utf-8")
    return unit


@needs_systemd_analyze
def test_the_printed_unit_passes_systemd_analyze_verify(tmp_path: pathlib.Path) -> None:
    unit = printed_unit(tmp_path, EXAMPLE)
    text = unit.read_text(encoding="utf-8")
    assert f"ExecStart={AGENT} run -c /etc/stowhook/stowhook-agent.toml" in text
    assert "ReadWritePaths=/var/spool/stowhook" in text.splitlines()
    code, about_our_unit = verify(unit)
    assert (code, about_our_unit) == (0, [])


@needs_systemd_analyze
def test_verify_would_catch_a_broken_unit(tmp_path: pathlib.Path) -> None:
    """The control: the assertions above are not vacuous."""
    unit = printed_unit(tmp_path, EXAMPLE)
    text = unit.read_text(encoding="utf-8")
    unit.write_text(text.replace("Type=exec", "Type=exec\nProtectSystem=stricter"))
    code, about_our_unit = verify(unit)
    assert any("stricter" in line for line in about_our_unit), about_our_unit
    unit.write_text(text.replace(str(AGENT), "/nonexistent/relay-agent"))
    code, about_our_unit = verify(unit)
    assert code != 0
    assert any("/nonexistent/relay-agent" in line for line in about_our_unit)


@needs_systemd_analyze
def test_awkward_paths_are_quoted_so_that_systemd_reads_them_back(
    tmp_path: pathlib.Path,
) -> None:
    """Spaces, % and $ in the paths the unit names. verify checks that ExecStart names a
    program that exists, so a misquoted executable path would fail it."""
    folder = tmp_path / "my tools 100%"
    folder.mkdir()
    executable = folder / "relay-agent"
    executable.symlink_to(AGENT)
    config = tmp_path / "agent.toml"
    config.write_text(
        'server = "relay.example.com:50051"\ntoken_file = "/etc/stowhook/my token"\n'
        '[[subscription]]\nbucket = "b"\ndir = "/var/spool/web hooks %d"\n'
    )
    where = ["--executable", str(executable), "--config-dir", "/etc/stow $hook"]
    unit = printed_unit(tmp_path, config, *where)
    text = unit.read_text(encoding="utf-8")
    assert 'ReadWritePaths="/var/spool/web hooks %%d"' in text.splitlines()
    quoted_program = '"' + str(executable).replace("%", "%%") + '"'
    assert f'ExecStart={quoted_program} run -c "/etc/stow $$hook/stowhook-agent.toml"' in text
    code, about_our_unit = verify(unit)
    assert (code, about_our_unit) == (0, [])


def test_install_status_uninstall(tmp_path: pathlib.Path) -> None:
    unit_dir, config_dir = tmp_path / "systemd", tmp_path / "stowhook"
    where = ["--unit-dir", str(unit_dir), "--config-dir", str(config_dir)]
    config = tmp_path / "agent.toml"
    shutil.copyfile(EXAMPLE, config)

    done = relay_agent("install", "-c", str(config), "--user", ME, "--no-start", *where)
    assert done.returncode == 0, done.stderr
    assert "not started (--no-start)" in done.stdout
    unit, installed = unit_dir / "stowhook-agent.service", config_dir / "stowhook-agent.toml"
    assert stat.S_IMODE(installed.stat().st_mode) == 0o600
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    assert installed.read_bytes() == EXAMPLE.read_bytes()
    assert f"-c {installed}" in unit.read_text(encoding="utf-8")

    again = relay_agent("install", "-c", str(config), "--user", ME, "--no-start", *where)
    assert again.returncode == 2 and "use --force" in again.stderr

    status = relay_agent("status", "--json", *where)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["installed"] and report["generated"] and report["config_exists"]
    assert report["unit_file"] == str(unit) and report["config_file"] == str(installed)

    done = relay_agent("uninstall", "--purge", *where)
    assert done.returncode == 0, done.stderr
    assert not unit.exists() and not installed.exists()
    assert json.loads(relay_agent("status", "--json", *where).stdout)["installed"] is False


@needs_systemd_analyze
def test_the_sandbox_scores_well_in_systemd_analyze_security(tmp_path: pathlib.Path) -> None:
    """A guard against losing hardening: systemd's own offline exposure score (0 is the
    most locked down, 10 the least) stays at 2.0 or below. It was 1.5 when written."""
    done = relay_agent("install", "--print", "-c", str(EXAMPLE))  # User=stowhook
    unit = tmp_path / "stowhook-agent.service"
    unit.write_text(done.stdout, encoding="utf-8")
    assert SYSTEMD_ANALYZE is not None
    scored = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--threshold=20", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    said = scored.stdout + scored.stderr
    if "--offline" in said and ("unrecognized" in said or "unknown" in said):
        pytest.skip("this systemd-analyze cannot score a unit offline (systemd < 250)")
    verdict = [line for line in said.splitlines() if "Overall exposure level" in line]
    assert scored.returncode == 0, verdict or said
