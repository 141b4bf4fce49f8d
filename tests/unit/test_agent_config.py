"""The agent's TOML config file, and the run/check command lines that use it."""

from __future__ import annotations

import asyncio
import pathlib
import textwrap

import pytest
import structlog
from click.testing import CliRunner

from relay_agent import cli, config, errors, settings, supervisor

TOKEN = "shk_key1.secret-part"

EXAMPLE = """\
server = "relay.example.com:50051"
token_file = "agent.token"   # relative to the config file
ca_file = "/etc/stowhook/ca.pem"
name = "billing-box"

[[subscription]]
bucket = "github"
forward = "http://127.0.0.1:9000/hooks"
max_in_flight = 8
timeout = 30

[[subscription]]
bucket = "stripe"
exec = "/usr/local/bin/handle-stripe --verbose 'two words'"
timeout = 120

[[subscription]]
bucket = ["exports", "archive"]
dir = "spool"
dir_format = "raw"
"""


def parse(text: str, base_dir: pathlib.Path | None = None, **options: object):
    values: dict[str, object] = {
        "source": "agent.toml",
        "base_dir": base_dir or pathlib.Path("/etc/stowhook"),
        "environ": {},
        "fallback_token": TOKEN,
    }
    values.update(options)
    return config.parse(textwrap.dedent(text), **values)  # type: ignore[arg-type]


def error_of(text: str, **options: object) -> str:
    with pytest.raises(errors.ConfigError) as caught:
        parse(text, **options)
    return str(caught.value)


# ---- a valid file ---------------------------------------------------------------------


def test_the_example_file(tmp_path: pathlib.Path) -> None:
    (tmp_path / "agent.token").write_text(f"  {TOKEN}\n")
    (tmp_path / "agent.token").chmod(0o600)
    loaded = parse(EXAMPLE, base_dir=tmp_path, fallback_token=None)
    github, stripe, exports = loaded.subscriptions
    assert github.agent.server == "relay.example.com:50051"
    assert github.agent.token == TOKEN
    assert github.agent.agent_name == "billing-box"
    assert github.agent.ca_file == pathlib.Path("/etc/stowhook/ca.pem")
    assert github.agent.max_in_flight == 8
    assert github.destination == settings.HttpDestinationSettings(
        url="http://127.0.0.1:9000/hooks", timeout_s=30.0
    )
    assert stripe.agent.max_in_flight == settings.DEFAULT_MAX_IN_FLIGHT
    assert stripe.destination == settings.ExecDestinationSettings(
        argv=("/usr/local/bin/handle-stripe", "--verbose", "two words"), timeout_s=120.0
    )
    assert exports.agent.buckets == ("exports", "archive")
    assert exports.destination == settings.DirDestinationSettings(
        path=tmp_path / "spool", format=settings.DirFormat.RAW
    )
    assert [s.label for s in loaded.subscriptions] == [
        "subscription[0]",
        "subscription[1]",
        "subscription[2]",
    ]


def test_a_subscription_overrides_the_top_level() -> None:
    loaded = parse(
        """
        server = "relay:1"
        insecure = true
        max_in_flight = 4
        timeout = 5
        [[subscription]]
        bucket = "a"
        forward = "http://127.0.0.1:9/"
        [[subscription]]
        bucket = "b"
        server = "other:2"
        token = "other.token"
        max_in_flight = 2
        exec = ["/bin/handler", "--x y"]
        shell = false
        """
    )
    first, second = loaded.subscriptions
    assert (first.agent.server, first.agent.max_in_flight, first.agent.token) == (
        "relay:1",
        4,
        TOKEN,
    )
    assert first.destination.timeout_s == 5.0  # type: ignore[union-attr]
    assert (second.agent.server, second.agent.max_in_flight) == ("other:2", 2)
    assert second.agent.token == "other.token"
    assert second.agent.insecure is True
    assert second.destination == settings.ExecDestinationSettings(
        argv=("/bin/handler", "--x y"), timeout_s=5.0
    )


def test_shell_runs_the_command_with_sh() -> None:
    loaded = parse(
        """
        server = "relay:1"
        [[subscription]]
        bucket = "a"
        exec = "jq .id | logger"
        shell = true
        """
    )
    assert loaded.subscriptions[0].destination.argv == ("/bin/sh", "-c", "jq .id | logger")  # type: ignore[union-attr]


def test_token_from_the_environment() -> None:
    text = """
        server = "relay:1"
        token_env = "MY_TOKEN"
        [[subscription]]
        bucket = "a"
        dir = "/tmp/x"
        """
    loaded = parse(text, environ={"MY_TOKEN": " env.token\n"}, fallback_token=None)
    assert loaded.subscriptions[0].agent.token == "env.token"
    message = error_of(text, fallback_token=None)
    assert message == (
        "agent.toml line 3: token_env: the environment variable MY_TOKEN is not set or empty"
    )


def test_an_inline_token_in_a_readable_file_is_warned_about_but_never_logged() -> None:
    text = """
        server = "relay:1"
        token = "key9.very-secret"
        [[subscription]]
        bucket = "a"
        dir = "/tmp/x"
        """
    with structlog.testing.capture_logs() as logs:
        parse(text, private=True)
        assert logs == []
        loaded = parse(text, private=False)
    assert [entry["event"] for entry in logs] == ["token_in_readable_file"]
    assert "very-secret" not in repr(logs)
    assert "very-secret" not in repr(loaded)


def test_load_reads_the_file_and_its_mode(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        'server = "relay:1"\ntoken = "k.s"\n[[subscription]]\nbucket = "a"\ndir = "d"\n'
    )
    path.chmod(0o644)
    with structlog.testing.capture_logs() as logs:
        loaded = config.load(path, environ={})
    assert loaded.subscriptions[0].destination == settings.DirDestinationSettings(
        path=tmp_path / "d"
    )
    assert [entry["event"] for entry in logs] == ["token_in_readable_file"]
    with pytest.raises(errors.ConfigError, match="cannot read the config file"):
        config.load(tmp_path / "missing.toml", environ={})


# ---- errors name the key and the line -------------------------------------------------

BASE = """\
server = "relay:1"

[[subscription]]
bucket = "a"
forward = "http://127.0.0.1:9/"

[[subscription]]
bucket = "b"
"""


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            "max_in_flight = 0\ndir = '/d'\n",
            "agent.toml line 9: subscription[1].max_in_flight must be an integer "
            "from 1 to 10000, not 0",
        ),
        (
            "forwrd = 'http://127.0.0.1:9/'\n",
            "agent.toml line 9: unknown key 'forwrd' in subscription[1] (did you mean 'forward'?)",
        ),
        (
            "",
            "agent.toml line 7: subscription[1] needs a destination: "
            "give exactly one of forward, exec or dir",
        ),
        (
            "dir = '/d'\nexec = 'x'\n",
            "agent.toml line 10: subscription[1] has several destinations: "
            "give exactly one of forward, exec or dir",
        ),
        (
            "dir = '/d'\nshell = true\n",
            "agent.toml line 10: subscription[1].shell applies only to exec destinations",
        ),
        (
            "dir = '/d'\ntimeout = 3\n",
            "agent.toml line 10: subscription[1].timeout does not "
            "apply to dir destinations (writes are local)",
        ),
        (
            "dir = '/d'\ndir_format = 'xml'\n",
            'agent.toml line 10: subscription[1].dir_format must be one of "json", "raw"',
        ),
        (
            "exec = 'x'\ntimeout = -1\n",
            "agent.toml line 10: subscription[1].timeout must be a number of seconds > 0",
        ),
        (
            "exec = 'x'\ntimeout = true\n",
            "agent.toml line 10: subscription[1].timeout must be a number of seconds > 0",
        ),
        (
            'exec = "echo \'open"\n',
            "agent.toml line 9: subscription[1].exec: cannot split the "
            'exec command "echo \'open": No closing quotation (fix the quoting, or run it '
            "through /bin/sh with --shell)",
        ),
        (
            "exec = ['x']\nshell = true\n",
            "agent.toml line 9: subscription[1].exec: shell = true needs exec as one string",
        ),
        (
            "exec = 3\n",
            "agent.toml line 9: subscription[1].exec: must be a command string or a "
            "list of arguments",
        ),
        (
            "forward = 'ftp://x/'\n",
            "agent.toml line 9: subscription[1].forward: invalid forward "
            "URL 'ftp://x/': expected http://HOST[:PORT][/PATH] or https://...",
        ),
        (
            "dir = '/d'\nserver = 'nope'\n",
            "agent.toml line 10: subscription[1].server: invalid "
            "server address 'nope': expected HOST:PORT, e.g. relay.example.com:7443",
        ),
        (
            "dir = '/d'\ninsecure = 'yes'\n",
            "agent.toml line 10: subscription[1].insecure must be true or false",
        ),
        (
            "dir = '/d'\nname = ''\n",
            "agent.toml line 10: subscription[1].name must be a non-empty string",
        ),
        (
            "dir = '/d'\ntoken = 'k.s'\ntoken_env = 'X'\n",
            "agent.toml line 11: subscription[1].token_env and token are both set: give one",
        ),
        (
            "dir = '/d'\ntoken = 'no-dot'\n",
            "agent.toml line 10: subscription[1].token: "
            "malformed agent token: expected <key_id>.<secret> (the key id, a dot, then the "
            "secret, as shown when the token was created)",
        ),
    ],
)
def test_errors_name_the_key_and_the_line(extra: str, message: str) -> None:
    assert error_of(BASE + extra) == message


def test_keepalive_and_output_keys() -> None:
    loaded = parse(
        """
        server = "relay:1"
        keepalive_time = 1
        [[subscription]]
        bucket = "a"
        keepalive_timeout = 2.5
        output = "audit"
        forward = "http://127.0.0.1:9/"
        """
    )
    (only,) = loaded.subscriptions
    assert (only.agent.keepalive_time_ms, only.agent.keepalive_timeout_ms) == (1000, 2500)
    assert only.agent.output == "audit"
    with pytest.raises(errors.ConfigError, match="keepalive_time"):
        parse(
            'server = "relay:1"\nkeepalive_time = 0\n[[subscription]]\nbucket = "a"\n'
            'forward = "http://127.0.0.1:9/"\n'
        )


def test_a_bucket_in_two_subscriptions() -> None:
    text = BASE.replace('bucket = "b"', 'bucket = ["c", "a"]') + "dir = '/d'\n"
    assert error_of(text) == (
        "agent.toml line 8: subscription[1].bucket 'a' (output 'default') is already in "
        "subscription[0]: give each bucket to one subscription"
    )


def test_one_bucket_in_two_subscriptions_for_two_outputs() -> None:
    text = BASE.replace('bucket = "b"', 'bucket = "a"\noutput = "audit"') + "dir = '/d'\n"
    loaded = parse(text)
    assert [(s.agent.buckets, s.agent.output) for s in loaded.subscriptions] == [
        (("a",), "default"),
        (("a",), "audit"),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("server = 'relay:1'\n", "agent.toml: no [[subscription]]: configure at least one"),
        (
            "server = 'relay:1'\n[subscription]\nbucket = 'a'\n",
            "agent.toml line 2: subscription must be an array of tables: "
            "write each as [[subscription]]",
        ),
        (
            "server = 'relay:1'\nbucket = 'a'\n",
            "agent.toml line 2: unknown key 'bucket' in the top level "
            "(it belongs in a [[subscription]])",
        ),
        (
            "[[subscription]]\nbucket = 'a'\ndir = '/d'\n",
            "agent.toml line 1: missing the key 'server' (at the top level or in subscription[0])",
        ),
        (
            "server = 'relay:1'\n[[subscription]]\ndir = '/d'\n",
            'agent.toml line 2: subscription[0] needs bucket = "NAME"',
        ),
        (
            "server = 'relay:1'\n[[subscription]]\nbucket = ['a', 'a']\ndir = '/d'\n",
            "agent.toml line 3: subscription[0].bucket lists the same bucket twice",
        ),
        (
            "server = 'relay:1'\n[[subscription]]\nbucket = ' a'\ndir = '/d'\n",
            "agent.toml line 3: subscription[0].bucket must be a bucket name or a non-empty "
            "list of names",
        ),
        (
            "server = 'relay:1'\n[[subscription]\n",
            "agent.toml: invalid TOML: Expected ']]' at the end of an array declaration "
            "(at line 2, column 15)",
        ),
    ],
)
def test_file_level_errors(text: str, message: str) -> None:
    assert error_of(text) == message


def test_no_token_anywhere() -> None:
    text = "server = 'relay:1'\n[[subscription]]\nbucket = 'a'\ndir = '/d'\n"
    assert error_of(text, fallback_token=None).startswith("agent.toml: no agent token")


def test_a_token_file_that_cannot_be_read(tmp_path: pathlib.Path) -> None:
    text = "server = 'relay:1'\ntoken_file = 'nope'\n[[subscription]]\nbucket = 'a'\ndir = '/d'\n"
    assert error_of(text, base_dir=tmp_path) == (
        f"agent.toml line 2: token_file: cannot read the token file {tmp_path}/nope: "
        "No such file or directory"
    )


def test_keys_inside_multiline_strings_are_not_taken_for_keys() -> None:
    text = (
        'server = "relay:1"\n'
        'name = """\n'
        "max_in_flight = 3\n"
        '"""\n'
        "[[subscription]]\n"
        "bucket = 'a'\n"
        "dir = '/d'\n"
        "max_in_flight = 0\n"
    )
    assert error_of(text).startswith("agent.toml line 8: subscription[0].max_in_flight")


# ---- the command line -----------------------------------------------------------------


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli.main, list(args))
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes else "")


RUN = ["run", "--server", "127.0.0.1:1", "--insecure", "--bucket", "b", "--token", "k.s"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give exactly one destination: --forward URL, --exec COMMAND or --dir PATH"),
        (
            ["--forward", "http://127.0.0.1:9/", "--dir", "/tmp/x"],
            "(got --forward and --dir)",
        ),
        (["--dir", "/tmp/x", "--shell"], "--shell applies only to --exec"),
        (["--exec", "x", "--dir-format", "raw"], "--dir-format applies only to --dir"),
        (["--dir", "/tmp/x", "--timeout", "3"], "--timeout does not apply to --dir"),
        (["--exec", "/nonexistent/handler"], "the exec program /nonexistent/handler does not"),
        (["--exec", "echo 'open"], "No closing quotation"),
    ],
)
def test_run_destination_errors(args: list[str], message: str) -> None:
    code, output = invoke(*RUN, *args)
    assert code == 2
    assert message in output


def test_run_with_a_config_file_refuses_the_flags_it_replaces(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("")
    code, output = invoke("run", "-c", str(path), "--server", "x:1", "--forward", "http://h/")
    assert code == 2
    assert "-c/--config replaces --server, --forward" in output


def test_run_with_an_invalid_config_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(BASE + "forwrd = 'x'\n")
    code, output = invoke("run", "-c", str(path), "--token", "k.s")
    assert code == 2
    assert f"error: {path} line 9: unknown key 'forwrd'" in output


def test_run_with_an_exec_program_that_is_missing_names_the_subscription(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(BASE + "exec = 'definitely-not-a-program-here'\n")
    code, output = invoke("run", "-c", str(path), "--token", "k.s")
    assert code == 2
    assert "subscription[1]: the exec program 'definitely-not-a-program-here' is not in PATH" in (
        output
    )


def test_check_reports_an_invalid_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(BASE + "dir = 'd'\nmax_in_flight = -1\n")
    code, output = invoke("check", "-c", str(path), "--token", "k.s")
    assert code == 2
    assert f"{path} line 10: subscription[1].max_in_flight must be an integer" in output


def test_check_reports_a_local_problem_without_connecting(tmp_path: pathlib.Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    path = tmp_path / "agent.toml"
    path.write_text(
        "server = '127.0.0.1:1'\ninsecure = true\ntoken = 'k.s'\n"
        f"[[subscription]]\nbucket = 'a'\ndir = '{a_file}'\n"
    )
    path.chmod(0o600)
    code, output = invoke("check", "-c", str(path))
    assert code == 2
    assert f"{path}: valid, 1 subscription" in output
    assert f"FAIL  subscription[0] (bucket a -> dir {a_file} (json)): " in output
    assert "is not a directory" in output


# ---- several subscriptions in one process ---------------------------------------------


class FakeAgent:
    """Runs until stopped, or fails after `fail_after` seconds."""

    def __init__(self, fail_after: float | None = None) -> None:
        self.stopped = asyncio.Event()
        self.finished = False
        self._fail_after = fail_after

    async def run(self) -> None:
        try:
            if self._fail_after is not None:
                await asyncio.sleep(self._fail_after)
                raise errors.TokenRefused("refused", key_id="k")
            await self.stopped.wait()
            await asyncio.sleep(0.05)  # a graceful shutdown takes a moment
        finally:
            self.finished = True

    def stop(self) -> None:
        self.stopped.set()


async def test_a_failing_subscription_stops_the_others_then_its_error_is_raised() -> None:
    healthy, failing, other = FakeAgent(), FakeAgent(fail_after=0.05), FakeAgent()
    with pytest.raises(errors.TokenRefused):
        await asyncio.wait_for(
            supervisor.run_together([("a", healthy), ("b", failing), ("c", other)]), 5
        )
    assert healthy.stopped.is_set() and other.stopped.is_set()
    assert healthy.finished and other.finished, "they shut down before the error is raised"


async def test_stopping_stops_every_subscription() -> None:
    agents = [("a", FakeAgent()), ("b", FakeAgent())]
    task = asyncio.create_task(supervisor.run_together(agents))
    await asyncio.sleep(0.05)
    assert not task.done()
    for _label, fake in agents:
        fake.stop()
    await asyncio.wait_for(task, 5)
    assert all(fake.finished for _label, fake in agents)


async def test_cancelling_stops_them_gracefully_and_waits() -> None:
    agents = [("a", FakeAgent()), ("b", FakeAgent())]
    task = asyncio.create_task(supervisor.run_together(agents))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert all(fake.finished for _label, fake in agents)


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_agents_that_run_scripts_stay_on_asyncio_others_run_on_uvloop() -> None:
    forwarding = parse(
        """
        server = "relay:1"
        [[subscription]]
        bucket = "a"
        forward = "http://127.0.0.1:8000/"
        [[subscription]]
        bucket = "b"
        dir = "/tmp/events"
        """
    )
    scripting = parse(
        """
        server = "relay:1"
        [[subscription]]
        bucket = "a"
        forward = "http://127.0.0.1:8000/"
        [[subscription]]
        bucket = "b"
        exec = "/usr/local/bin/handle"
        """
    )
    assert not cli._runs_scripts(forwarding)
    assert cli._runs_scripts(scripting)
    assert cli._run_loop(_loop_module(), fast=True).startswith("uvloop")  # the fast extra
    assert cli._run_loop(_loop_module(), fast=False).startswith("asyncio")
