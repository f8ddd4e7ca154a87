"""The command line against real sockets and real subprocesses: `eyed health`, `eyed subscribe`, `eyed run`."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from eyed.cli import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, EXIT_USAGE, build_parser
from eyed.config import PublishConfig
from eyed.publisher import Publisher
from tests.conftest import ROOT
from tests.daemon_helpers import daemon_env, finish, start_daemon


def eyed(
    *args: str, settings: dict[str, object] | None = None, timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    """`python -m eyed ARGS` as a real process, ``settings`` in its environment; a hang fails the test instead
    of blocking it."""
    return subprocess.run(
        [sys.executable, "-m", "eyed", *args],
        env=daemon_env(settings or {}),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@pytest.fixture
def heartbeats(endpoint: str) -> Iterator[str]:
    """A real publisher on ``endpoint`` on which only the source ``door2`` is alive, heartbeating every 0.1 s."""
    stop = threading.Event()

    def beat() -> None:
        with Publisher(PublishConfig(endpoint=endpoint, linger_ms=0)) as pub:
            ready.set()
            while not stop.wait(0.1):
                pub.send("health.door2", {"type": "health", "source": "door2", "state": "live", "frames": 10})

    ready = threading.Event()
    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield endpoint
    finally:
        stop.set()
        thread.join(10)


def test_health_wants_the_exact_source(heartbeats: str) -> None:
    """A SUB filter is a prefix: `--source door` must not take door2's heartbeat for its own."""
    other = eyed("health", "--endpoint", heartbeats, "--source", "door", "--timeout", "2")
    assert other.returncode == EXIT_FAILURE, other.stdout + other.stderr
    assert "door2" not in other.stdout
    assert "no live heartbeat" in other.stderr
    same = eyed("health", "--endpoint", heartbeats, "--source", "door2", "--timeout", "10")
    assert same.returncode == EXIT_OK, same.stderr
    assert "health.door2 state=live" in same.stdout
    anyone = eyed("health", "--endpoint", heartbeats, "--timeout", "10")
    assert anyone.returncode == EXIT_OK, anyone.stderr


@pytest.mark.parametrize("command", ["subscribe", "health"])
@pytest.mark.parametrize("value", ["-1", "0", "-0.5", "inf", "-inf", "nan", "1e300", "soon"])
def test_a_timeout_must_be_positive_and_finite(command: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    """ZeroMQ's poll waits for ever on a negative timeout and overflows on a huge one."""
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([command, f"--timeout={value}"])
    assert info.value.code == EXIT_USAGE
    assert f"argument --timeout: {value}" in capsys.readouterr().err.replace("'", "")


def test_a_negative_timeout_exits_at_once(endpoint: str) -> None:
    result = eyed("subscribe", "--endpoint", endpoint, "--timeout", "-1", timeout_s=30)
    assert result.returncode == EXIT_USAGE
    assert "--timeout" in result.stderr


@pytest.mark.parametrize("value", ["0.5", "12", "3600"])
def test_ordinary_timeouts_parse(value: str) -> None:
    assert build_parser().parse_args(["health", "--timeout", value]).timeout == float(value)


def test_run_refuses_a_malformed_endpoint_before_loading_the_model(base: dict[str, object]) -> None:
    """Exit 78, which the unit's RestartPreventExitStatus=78 does not restart; not 69 after loading the model,
    which systemd would retry for ever."""
    settings = {**base, "publish.endpoint": "tcp://127.0.0.1:notaport", "publish.wait_subscribers": 0}
    code, err = finish(start_daemon(settings))
    assert code == EXIT_CONFIG, err
    assert "publish.endpoint" in err and "notaport" in err
    assert "warm-up" not in err


def test_check_config_is_what_run_says(tmp_path: Path, base: dict[str, object]) -> None:
    """The same missing file: `eyed check-config` and `eyed run` both exit 78 with the same message."""
    settings = {**base, "drift.reference": str(tmp_path / "missing.json"), "publish.wait_subscribers": 0}
    check = eyed("check-config", settings=settings)
    code, err = finish(start_daemon(settings))
    assert check.returncode == code == EXIT_CONFIG, (check.stderr, err)
    message = "drift.reference " + str(tmp_path / "missing.json")
    assert message in check.stderr and message in err
