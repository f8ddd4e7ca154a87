"""The command line against real sockets and real subprocesses: `eyed health`, `eyed subscribe`, `eyed run`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from eyed.cli import (
    EXIT_CANTCREAT,
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    _summary,
    build_parser,
)
from eyed.config import PublishConfig
from eyed.logs import under_journald
from eyed.publisher import Publisher
from tests.conftest import ROOT, free_port
from tests.daemon_helpers import daemon_env, finish, journal_stream, start_daemon


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


@contextlib.contextmanager
def beating(bind: str, every_s: float = 0.1, junk: bool = False, state: str = "live") -> Iterator[None]:
    """A real publisher bound to ``bind`` on which only the source ``door2`` heartbeats, in ``state``, every
    ``every_s``; with ``junk``, each heartbeat follows messages that are not eyed events (another program's)."""
    stop = threading.Event()
    ready = threading.Event()

    def beat() -> None:
        with Publisher(PublishConfig(endpoint=bind, linger_ms=0)) as pub:
            ready.set()
            while not stop.wait(every_s):
                if junk:
                    for parts in JUNK:
                        pub.socket.send_multipart(parts)  # type: ignore[union-attr]
                pub.send("health.door2", {"type": "health", "source": "door2", "state": state, "frames": 10})

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


# Messages another publisher might send: one part, three, no JSON, JSON but no object, a topic not in UTF-8.
JUNK = [
    [b"health.x"],
    [b"health.x", b"{}", b"{}"],
    [b"health.x", b"not json"],
    [b"health.x", b"[1, 2]"],
    [b"health.\xff", b"{}"],
]


@pytest.fixture
def heartbeats(endpoint: str) -> Iterator[str]:
    with beating(endpoint):
        yield endpoint


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


def test_health_fails_on_a_stalled_source(endpoint: str) -> None:
    """A daemon that heartbeats while its camera is stalled is not healthy: the check a supervisor runs must
    fail, though heartbeats keep coming. Without it, a check loosened to pass a stalled (frozen or silent)
    camera went unseen: no other test sends a heartbeat that is not live."""
    with beating(endpoint, state="stalled"):
        result = eyed("health", "--endpoint", endpoint, "--timeout", "1.5")
    assert result.returncode == EXIT_FAILURE, result.stdout + result.stderr
    assert "health.door2 state=stalled" in result.stdout
    assert "no live heartbeat" in result.stderr


def test_a_curve_key_without_the_server_key_says_they_go_together(endpoint: str, tmp_path: Path) -> None:
    """Half a CURVE pair is a usage mistake: the message names both options. Without the check, the exit code
    is still 78 but the message is about a certificate file that cannot be read."""
    secret = tmp_path / "sub.key_secret"
    result = eyed("subscribe", "--endpoint", endpoint, "--timeout", "1", "--curve-key", str(secret))
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert "--curve-key and --server-key go together" in result.stderr


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


def test_check_config_refuses_providers_run_refuses(base: dict[str, object]) -> None:
    """An execution provider this onnxruntime lacks: `eyed run` exits 78, so `eyed check-config` (which
    install.sh runs) must say so first, with the same message."""
    settings = {**base, "model.providers": '["NoSuchExecutionProvider", "CPUExecutionProvider"]'}
    check = eyed("check-config", settings=settings)
    code, err = finish(start_daemon({**settings, "publish.wait_subscribers": 0}))
    assert check.returncode == code == EXIT_CONFIG, (check.stderr, err)
    message = "model.providers: NoSuchExecutionProvider not available in this onnxruntime build"
    assert message in check.stderr and message in err
    # The torch backend has no providers to check; nor does a configuration naming only what is there.
    torch = {k: v for k, v in settings.items() if k != "model.onnx"}
    assert eyed("check-config", settings={**torch, "model.backend": "torch"}).returncode == EXIT_OK
    assert eyed("check-config", settings=base).returncode == EXIT_OK


def journald(*args: str, settings: dict[str, object] | None = None, script: str | None = None) -> tuple[int, str]:
    """`eyed ARGS` (or a Python ``script``) with stderr as systemd hands it to journald: JOURNAL_STREAM set."""
    argv = [sys.executable, "-c", script] if script is not None else [sys.executable, "-m", "eyed", *args]
    with journal_stream() as (stderr, journal):
        result = subprocess.run(
            argv,
            env=daemon_env(settings or {}, **journal),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
            timeout=60,
            check=False,
        )
        stderr.seek(0)
        return result.returncode, stderr.read()


def test_journald_is_told_by_stderr_itself_not_by_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """JOURNAL_STREAM is inherited, and set when only stdout goes to the journal: with stderr in a file
    (StandardError=file:...), lines would lose their timestamps and gain <N> prefixes."""
    with open(tmp_path / "stderr", "w") as stderr, open(tmp_path / "other", "w") as other:
        monkeypatch.setattr(sys, "stderr", stderr)
        for stream, expected in ((stderr, True), (other, False)):
            st = os.fstat(stream.fileno())
            monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
            assert under_journald() is expected
        for value in ("8:12345", "", "not a stream"):
            monkeypatch.setenv("JOURNAL_STREAM", value)
            assert not under_journald()


def test_fatal_errors_carry_the_err_priority_under_journald(base: dict[str, object], tmp_path: Path) -> None:
    """`journalctl -p err` must show why the service stopped: every line of the error, a multi-line one too,
    is prefixed <3>, and no line goes out without a priority."""
    code, err = journald("run", settings={**base, "source.limit": -1})
    assert code == EXIT_CONFIG, err
    lines = err.splitlines()
    assert lines[0] == "<3>eyed: invalid configuration:", err
    assert all(line.startswith("<3>") for line in lines) and any("source.limit" in line for line in lines), err
    # After logging is set up: the log lines have theirs, the fatal error err.
    code, err = journald("run", settings={**base, "source.split": "nope"})
    assert code not in (0, 1), err
    lines = err.splitlines()
    assert all(line.startswith("<") for line in lines), err
    assert lines[-1].startswith("<3>eyed: ") and "nope" in lines[-1], err


UNCAUGHT = """
import sys
import eyed.cli


def broken(args):
    raise RuntimeError("nobody saw this coming")


eyed.cli.cmd_check_config = broken
sys.argv = ["eyed", "check-config"]
sys.exit(eyed.cli.main())
"""


def test_an_uncaught_exception_is_logged_with_a_priority() -> None:
    """A bug's traceback goes through logging at CRITICAL: under journald each of its lines is <2>, not the
    default (info) priority the interpreter's own hook leaves it at."""
    code, err = journald(script=UNCAUGHT)
    assert code == EXIT_FAILURE, err
    lines = err.splitlines()
    assert lines[0] == "<2>eyed: uncaught exception: nobody saw this coming", err
    assert all(line.startswith("<2>") for line in lines), err
    assert "<2>Traceback (most recent call last):" in lines and "RuntimeError: nobody saw this coming" in err


@pytest.mark.parametrize("host", ["*", "0.0.0.0", "lo"])
def test_health_reaches_where_the_configured_endpoint_binds(host: str) -> None:
    """`eyed health --config /etc/eyed/eyed.toml` on the board: publish.endpoint is a bind address (tcp://*:P,
    an interface), which subscribe and health reach through the loopback, not connect to as written."""
    port = free_port()
    with beating(f"tcp://{host}:{port}"):
        result = eyed("health", "--timeout", "10", settings={"publish.endpoint": f"tcp://{host}:{port}"})
        assert result.returncode == EXIT_OK, result.stderr
        assert "health.door2 state=live" in result.stdout
        events = eyed("subscribe", "--count", "1", "--json", settings={"publish.endpoint": f"tcp://{host}:{port}"})
        assert events.returncode == EXIT_OK, events.stderr
        assert json.loads(events.stdout)["topic"] == "health.door2"


@pytest.mark.parametrize("endpoint", ["foo", "tcp://127.0.0.1", "ipc://", "tcp://127.0.0.1:*", "inproc://eyed"])
@pytest.mark.parametrize("command", ["subscribe", "health"])
def test_an_endpoint_no_subscriber_can_reach_is_a_config_error(endpoint: str, command: str) -> None:
    for given in (["--endpoint", endpoint], ["--set", f"publish.endpoint={endpoint}"]):
        result = eyed(command, *given, "--timeout", "1")
        assert result.returncode == EXIT_CONFIG, result.stderr
        assert result.stderr.startswith("eyed: ") and endpoint in result.stderr, result.stderr
        assert "Traceback" not in result.stderr, result.stderr


def test_messages_that_are_not_events_are_skipped_and_counted(endpoint: str) -> None:
    with beating(endpoint, junk=True):
        result = eyed("subscribe", "--endpoint", endpoint, "--count", "2", "--timeout", "10")
        health = eyed("health", "--endpoint", endpoint, "--timeout", "10")
    assert result.returncode == EXIT_OK, result.stderr
    assert result.stdout.splitlines() == ["health.door2 state=live frames=10"] * 2
    assert "Traceback" not in result.stderr and "message(s) that were not eyed events" in result.stderr
    assert health.returncode == EXIT_OK, health.stderr


def test_a_reader_that_stops_reading_ends_subscribe_quietly(endpoint: str) -> None:
    """`eyed subscribe | head -1`: the pipe closes under it, which is no error and no traceback."""
    with beating(endpoint, every_s=0.01):
        read, write = os.pipe()
        proc = subprocess.Popen(
            [sys.executable, "-m", "eyed", "subscribe", "--endpoint", endpoint, "--timeout", "10"],
            env=daemon_env({}),
            cwd=ROOT,
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.close(write)
        with os.fdopen(read) as reader:
            assert reader.readline().startswith("health.door2")
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_OK, err
    assert err == ""


def test_health_waits_two_heartbeats_by_default() -> None:
    """The default timeout follows publish.heartbeat_s: with heartbeats every 20 s, 12 s would report a live
    daemon dead between two of them."""
    port = free_port()
    result = eyed("health", settings={"publish.endpoint": f"tcp://127.0.0.1:{port}", "publish.heartbeat_s": 0.5})
    assert result.returncode == EXIT_FAILURE
    assert f"no live heartbeat on tcp://127.0.0.1:{port} within 3 s: nothing accepts connections" in result.stderr


def test_summaries_show_what_each_event_carries() -> None:
    label = {"type": "label", "seq": 3, "label": "cat", "score": 0.5, "truth": 0, "latency_ms": 2.5}
    assert _summary("label.x", label) == "label.x seq=3 cat:0.50 truth=0 2.5ms"
    drift = {"type": "drift", "status": "drift", "window": 7, "n": 250, "fired": ["psi"], "learning": False}
    assert _summary("drift.x", drift) == "drift.x status=drift window=7 n=250 fired=['psi'] learning=False"
    assert _summary("label.x", {"type": "label"}) == "label.x seq=? ?:?"


def test_summaries_escape_text_that_would_act_on_the_terminal() -> None:
    """A class name with a newline printed a second, forged event line; ANSI escapes reached the terminal."""
    label = {"type": "label", "seq": 3, "label": "cat\nlabel.x seq=99 forged\x1b[2J\u202e", "score": 0.5}
    line = _summary("label.x\r", label)
    assert line == "label.x\\r seq=3 cat\\nlabel.x seq=99 forged\\x1b[2J\\u202e:0.50"
    assert line.isprintable()
    assert _summary("label.x", {"type": "label", "label": "chat noir é 猫"}) == "label.x seq=? chat noir é 猫:?"


def test_keys_refuses_an_output_it_cannot_write(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    for folder in ("/proc/nope", str(tmp_path / "file")):
        result = eyed("keys", "--output", folder)
        assert result.returncode == EXIT_CANTCREAT and "Traceback" not in result.stderr, result.stderr
    result = eyed("keys", "--output", str(tmp_path), "--name", "x/y")
    assert result.returncode == EXIT_USAGE and "not a file name" in result.stderr
    assert list(tmp_path.iterdir()) == [tmp_path / "file"]


def test_a_refused_configuration_creates_no_output_folder(tmp_path: Path) -> None:
    out = tmp_path / "new" / "m.onnx"
    result = eyed("export", "--output", str(out), settings={"source.limit": -1})
    assert result.returncode == EXIT_CONFIG and "source.limit" in result.stderr
    assert not (tmp_path / "new").exists()


def test_a_command_that_fails_after_checking_its_output_leaves_no_folder_it_made(
    base: dict[str, object], tmp_path: Path
) -> None:
    """The output's folders are made up front, to fail before minutes of work if they cannot be: a run that
    fails later (here a replay with no frame past source.skip) removes those it made, and no other."""
    (tmp_path / "mine").mkdir()
    for out in (tmp_path / "new" / "deeper" / "ref.json", tmp_path / "mine" / "ref.json"):
        result = eyed("profile", "--output", str(out), settings={**base, "source.skip": 1000})
        assert result.returncode == EXIT_UNAVAILABLE and "no frames" in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"] and not list((tmp_path / "mine").iterdir())


def test_a_negative_seed_is_a_usage_error_before_any_work() -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["finetune", "--output", "x", "--seed", "-1"])
    assert info.value.code == EXIT_USAGE


SLOW_QUANTISATION = """
import sys
import time

import onnxruntime.quantization.shape_inference as shape_inference

real = shape_inference.quant_pre_process


def slow(*args, **kwargs):
    real(*args, **kwargs)
    print("quantising", flush=True)
    time.sleep(60)


shape_inference.quant_pre_process = slow
from eyed.cli import main

sys.exit(main())
"""


def test_sigterm_during_an_int8_export_removes_its_temporary_files(
    tiny_dataset: Path, tiny_checkpoint: Path, tiny_onnx: Path, tmp_path: Path
) -> None:
    """`timeout` or a cancelled job ends an export with SIGTERM: the default action left a NAME.<hex>.tmp.onnx
    beside the output and an eyed-quant-* folder (14 MB for MobileNetV2) in /tmp; Ctrl-C already cleaned up."""
    temp, out = tmp_path / "tmp", tmp_path / "out"
    temp.mkdir()
    out.mkdir()
    args = ["--set", f"source.dataset={tiny_dataset}", "--set", "source.split=train"]
    args += ["--set", f"model.id={tiny_checkpoint}", "--set", f"model.onnx={tiny_onnx}"]
    args += ["--output", str(out / "m8.onnx"), "--calibration", "6", "--check", "4"]
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_QUANTISATION, "export", "--int8", *args],
        env=daemon_env({}, TMPDIR=str(temp)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "quantising\n"
        assert list(temp.glob("eyed-quant-*")) and list(out.glob("*.tmp.onnx"))  # what there is to clean up
        proc.send_signal(signal.SIGTERM)
        code, err = finish(proc)
    finally:
        proc.kill()
    assert code == 128 + signal.SIGTERM, err
    assert list(temp.glob("eyed-*")) == [] and list(out.iterdir()) == []
