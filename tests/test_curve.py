"""CURVE on the event socket: only subscribers whose public key is allowed receive anything."""

from __future__ import annotations

import functools
import logging
import re
import signal
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from zmq.auth.thread import AuthenticationThread

from eyed import curve
from eyed.cli import EXIT_CONFIG, EXIT_OK, main
from eyed.config import ConfigError, PublishConfig
from eyed.curve import CurveError, RefusalLog, create_keys, load_keys
from eyed.daemon import reload_now
from eyed.publisher import Publisher, PublishError, check_curve
from eyed.sdnotify import Notifier
from eyed.subscriber import Subscriber
from tests.daemon_helpers import NotifyListener, finish, start_daemon


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """The daemon's pair, an allowed subscriber's pair (public key in clients/) and a stranger's pair."""
    server_pub, server_secret = create_keys(tmp_path / "server", "eyed")
    allowed_pub, allowed_secret = create_keys(tmp_path / "allowed", "dashboard")
    _, stranger_secret = create_keys(tmp_path / "stranger", "stranger")
    clients = tmp_path / "clients"
    clients.mkdir()
    (clients / allowed_pub.name).write_bytes(allowed_pub.read_bytes())
    return {
        "server_pub": server_pub,
        "server_secret": server_secret,
        "allowed_secret": allowed_secret,
        "stranger_secret": stranger_secret,
        "clients": clients,
    }


def test_eyed_keys_writes_a_pair_with_a_private_secret(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "--output", str(tmp_path / "k"), "--name", "cam1"]) == EXIT_OK
    public, secret = tmp_path / "k" / "cam1.key", tmp_path / "k" / "cam1.key_secret"
    assert str(public) in capsys.readouterr().out
    assert "secret-key" in secret.read_text() and "secret-key" not in public.read_text()
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    before = secret.read_bytes()
    assert main(["keys", "--output", str(tmp_path / "k"), "--name", "cam1"]) == EXIT_CONFIG  # never overwrites
    assert secret.read_bytes() == before


def test_only_the_allowed_key_receives(keys: dict[str, Path], endpoint: str) -> None:
    cfg = PublishConfig(endpoint=endpoint, curve_secret_key=keys["server_secret"], curve_clients=keys["clients"])
    with (
        Publisher(cfg) as pub,
        Subscriber(pub.endpoint, ("label.",), (keys["allowed_secret"], keys["server_pub"])) as allowed,
        Subscriber(pub.endpoint, ("label.",), (keys["stranger_secret"], keys["server_pub"])) as stranger,
        Subscriber(pub.endpoint, ("label.",)) as plain,
    ):
        # Three connect; the other two never complete a handshake, so they never count.
        with pytest.raises(PublishError, match="only 1 subscriber"):
            pub.wait_for_subscribers(2, 2)
        assert pub.peers == 1
        for seq in range(20):
            pub.send("label.cam", {"seq": seq})
        got = [allowed.receive(5)[1]["seq"] for _ in range(20)]
        assert got == list(range(20))
        for outsider in (stranger, plain):
            with pytest.raises(TimeoutError):
                outsider.receive(0.5)


def test_a_subscriber_that_gets_nothing_says_why(keys: dict[str, Path], endpoint: str, tmp_path: Path) -> None:
    """A refused subscriber used to hear only "no event within N s", and `eyed health` reported a live daemon
    dead: what its connection went through says which key or setting is wrong."""
    wrong_server, _ = create_keys(tmp_path / "wrong", "other-daemon")
    curve_on = PublishConfig(endpoint=endpoint, curve_secret_key=keys["server_secret"], curve_clients=keys["clients"])
    cases = [
        (curve_on, (keys["stranger_secret"], keys["server_pub"]), "refused this subscriber's CURVE key"),
        (curve_on, (keys["allowed_secret"], wrong_server), "is --server-key the daemon's public key?"),
        (curve_on, None, "the daemon uses CURVE: give --curve-key and --server-key"),
        (PublishConfig(endpoint=endpoint), (keys["allowed_secret"], keys["server_pub"]), "does not use CURVE"),
    ]
    for cfg, client, why in cases:
        with (
            Publisher(cfg) as pub,
            Subscriber(pub.endpoint, ("label.",), client) as sub,
            pytest.raises(TimeoutError, match=re.escape(why)),
        ):
            sub.receive(1.5)
    with Subscriber(endpoint, ("label.",)) as sub, pytest.raises(TimeoutError, match="nothing accepts connections"):
        sub.receive(1.5)
    # Connected and let in, with nothing sent: no reason given, for there is none to give.
    with (
        Publisher(curve_on) as pub,
        Subscriber(pub.endpoint, ("label.",), (keys["allowed_secret"], keys["server_pub"])) as sub,
    ):
        with pytest.raises(TimeoutError) as info:
            sub.receive(1.0)
        assert str(info.value).endswith("within 1 s") and sub.problem is None


def test_eyed_subscribe_with_keys(keys: dict[str, Path], endpoint: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`eyed subscribe --curve-key --server-key` is the allowed client; without them it hears nothing."""
    cfg = PublishConfig(endpoint=endpoint, curve_secret_key=keys["server_secret"], curve_clients=keys["clients"])
    with Publisher(cfg) as pub:
        stop = threading.Event()

        def publish() -> None:
            seq = 0
            while not stop.is_set():
                pub.send("label.cam", {"seq": seq})
                seq += 1
                stop.wait(0.02)

        sender = threading.Thread(target=publish)
        sender.start()
        try:
            curve = ["--curve-key", str(keys["allowed_secret"]), "--server-key", str(keys["server_pub"])]
            args = ["subscribe", "--endpoint", endpoint, "--count", "3", "--json", "--timeout", "10"]
            assert main([*args, *curve]) == EXIT_OK
            assert capsys.readouterr().out.count('"topic": "label.cam"') == 3
            assert main([*args[:-1], "1"]) == 1  # no keys: nothing within a second
            assert main([*args, "--curve-key", str(keys["allowed_secret"])]) == EXIT_CONFIG
        finally:
            stop.set()
            sender.join()


def _receives(pub: Publisher, curve: tuple[Path, Path]) -> bool:
    """Whether a new subscriber with these keys gets an event within a few seconds."""
    with Subscriber(pub.endpoint, ("label.",), curve) as sub:
        for _ in range(40):  # the handshake takes a moment: keep sending until it is through or refused
            pub.send("label.cam", {"seq": 0})
            try:
                sub.receive(0.1)
                return True
            except TimeoutError:
                continue
        return False


# Client key files pyzmq's reader takes (or chokes on) but no subscriber could ever use: each is an error naming
# the file, never a crash (the colon made pyzmq raise IndexError, which killed the daemon on SIGHUP), and never
# a key dropped (empty) or let in (truncated) in silence.
BROKEN_CLIENT_KEYS = {
    "not a certificate": "not a certificate\n",
    "colon, no =": 'metadata\ncurve\n    public-key: "ix*g]c+TBGC)k}wE*s+4dH<55/ueFVxHWS>xye8["\n',
    # pyzmq splits at the "=" inside the key and took "HWS>xye8[" for one.
    "colon, = in the key": 'metadata\ncurve\n    public-key: "ix*g]c+TBGC)k}wE*s+4dH<55/ueFV=HWS>xye8["\n',
    "empty key": 'metadata\ncurve\n    public-key = ""\n',
    "truncated key": 'metadata\ncurve\n    public-key = "ix*g]c+TBGC)k}wE*s+4dH<55/ueFV=HW"\n',
    "not z85": 'metadata\ncurve\n    public-key = "ix*g]c+TBGC)k}wE*s+4dH<55/ueFV=HWS>xye8~"\n',
}


@pytest.mark.parametrize("broken_key", BROKEN_CLIENT_KEYS.values(), ids=BROKEN_CLIENT_KEYS.keys())
def test_a_broken_allow_list_on_reload_keeps_the_previous_one(
    keys: dict[str, Path], endpoint: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, broken_key: str
) -> None:
    """SIGHUP with an unreadable key in the folder: an error in the log, READY=1 all the same, and the keys read
    before still let their subscribers in. A good folder read later takes effect, removals included."""
    cfg = PublishConfig(endpoint=endpoint, curve_secret_key=keys["server_secret"], curve_clients=keys["clients"])
    allowed = (keys["allowed_secret"], keys["server_pub"])
    listener = NotifyListener(tmp_path / "notify.sock")
    try:
        with Publisher(cfg) as pub, Notifier({"NOTIFY_SOCKET": str(listener.path)}) as notifier:
            assert _receives(pub, allowed)
            broken = keys["clients"] / "broken.key"
            broken.write_text(broken_key)
            reload = threading.Event()
            reload.set()
            with caplog.at_level(logging.ERROR, logger="eyed.daemon"):
                reload_now(reload, notifier, pub)
            assert "cannot read the client keys" in caplog.text and "previous allow-list stays in force" in caplog.text
            assert str(broken) in caplog.text
            listener.wait_for("READY=1", 5, after=listener.wait_for("RELOADING=1", 5))
            assert not reload.is_set()
            assert _receives(pub, allowed)

            broken.unlink()
            (keys["clients"] / "dashboard.key").unlink()
            assert pub.reload_clients() == 0
            assert not _receives(pub, allowed)  # removed: a new handshake is refused
    finally:
        listener.close()


def test_an_unreadable_allow_list_at_start_is_a_config_error(keys: dict[str, Path], endpoint: str) -> None:
    (keys["clients"] / "broken.key").write_text("not a certificate\n")
    cfg = PublishConfig(endpoint=endpoint, curve_secret_key=keys["server_secret"], curve_clients=keys["clients"])
    with pytest.raises(ConfigError, match=r"publish\.curve_clients.*cannot read the client keys"), Publisher(cfg):
        pass


def test_curve_settings_go_together() -> None:
    with pytest.raises(ValueError, match=r"curve_secret_key and publish\.curve_clients"):
        PublishConfig(curve_secret_key=Path("/x.key_secret"))


def test_a_public_key_given_as_the_secret_is_a_config_error(keys: dict[str, Path], endpoint: str) -> None:
    cfg = PublishConfig(endpoint=endpoint, curve_secret_key=keys["server_pub"], curve_clients=keys["clients"])
    with pytest.raises(ConfigError, match="no secret key"), Publisher(cfg):
        pass


def test_subscriber_with_a_missing_key_file_fails_cleanly(keys: dict[str, Path], tmp_path: Path) -> None:
    with (
        pytest.raises(CurveError, match="cannot read"),
        Subscriber("tcp://127.0.0.1:1", ("",), (tmp_path / "no", keys["server_pub"])),
    ):
        pass


def test_daemon_with_curve_serves_only_the_allowed_subscriber(
    base: dict[str, object], keys: dict[str, Path], endpoint: str
) -> None:
    settings = {
        **base,
        "publish.endpoint": endpoint,
        "publish.curve_secret_key": str(keys["server_secret"]),
        "publish.curve_clients": str(keys["clients"]),
    }
    with Subscriber(endpoint, ("label.",)) as plain:
        with Subscriber(endpoint, ("label.",), (keys["allowed_secret"], keys["server_pub"])) as allowed:
            proc = start_daemon(settings)  # base waits for 1 subscriber: only the allowed one counts
            labels = [allowed.receive(30)[1] for _ in range(11)]
            code, err = finish(proc)
        assert code == 0, err
        assert [p["seq"] for p in labels] == list(range(11))
        with pytest.raises(TimeoutError):
            plain.receive(0.5)


def test_sighup_reads_the_allow_list_again(
    base: dict[str, object], keys: dict[str, Path], endpoint: str, tmp_path: Path
) -> None:
    """A subscriber whose key is added after start-up gets in after a SIGHUP (systemctl reload), with the
    notify protocol's RELOADING=1 / READY=1 around it, and the daemon never stops."""
    newcomer_pub, newcomer_secret = create_keys(tmp_path / "newcomer", "newcomer")
    listener = NotifyListener(tmp_path / "notify.sock")
    settings = {
        **base,
        "publish.wait_subscribers": 0,
        "source.loop": True,
        "source.fps": 20,
        "publish.curve_secret_key": str(keys["server_secret"]),
        "publish.curve_clients": str(keys["clients"]),
    }
    curve = (newcomer_secret, keys["server_pub"])
    try:
        proc = start_daemon(settings, NOTIFY_SOCKET=str(listener.path))
        listener.wait_for("READY=1", 60)
        with Subscriber(endpoint, ("label.",), curve) as early, pytest.raises(TimeoutError):
            early.receive(2.0)  # not allowed yet (and, denied, it does not retry: a subscriber reconnects itself)
        (keys["clients"] / newcomer_pub.name).write_bytes(newcomer_pub.read_bytes())
        proc.send_signal(signal.SIGHUP)
        listener.wait_for("READY=1", 10, after=listener.wait_for("RELOADING=1", 10))
        with Subscriber(endpoint, ("label.",), curve) as newcomer:
            assert newcomer.receive(20)[0] == "label.tiny"
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        code, err = finish(proc)
        assert code == 0, err
        assert "CURVE allow-list read again, 2 key(s)" in err
    finally:
        listener.close()


def test_daemon_exits_78_on_a_missing_client_folder(
    base: dict[str, object], keys: dict[str, Path], tmp_path: Path
) -> None:
    settings = {
        **base,
        "publish.curve_secret_key": str(keys["server_secret"]),
        "publish.curve_clients": str(tmp_path / "nowhere"),
    }
    code, err = finish(start_daemon(settings))
    assert code == EXIT_CONFIG, err
    assert "publish.curve_clients" in err and "no such folder" in err


def _authenticators() -> int:
    return sum(isinstance(t, AuthenticationThread) for t in threading.enumerate())


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def _other_public(tmp_path: Path) -> str:
    public, _ = load_keys(create_keys(tmp_path / "other", "other")[0], secret=False)
    return public.decode()


# Ways to spoil the daemon's own NAME.key_secret: (what, how). Each used to pass check-config, then fail `run` with
# a ZMQError traceback (exit 1) or, for the colon, an IndexError.
BROKEN_SECRETS: dict[str, Callable[[Path, Path], object]] = {
    "two characters too many": lambda p, tmp: _edit(p, 'secret-key = "', 'secret-key = "~~'),
    "empty secret": lambda p, tmp: p.write_text(
        p.read_text().split("secret-key")[0] + 'secret-key = ""\n'  # the public key stays
    ),
    "colon, no =": lambda p, tmp: p.write_text(re.sub(r"secret-key = .*", 'secret-key: "abc"', p.read_text())),
    "a public key not its own": lambda p, tmp: _edit(p, load_keys(p, secret=False)[0].decode(), _other_public(tmp)),
}


@pytest.mark.parametrize(
    ("kind", "case"),
    [("client", case) for case in BROKEN_CLIENT_KEYS] + [("secret", case) for case in BROKEN_SECRETS],
    ids=lambda value: str(value),
)
def test_unusable_key_files_are_config_errors_naming_the_file(
    kind: str, case: str, keys: dict[str, Path], endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config, check_curve and the publisher's start all refuse the file (exit 78, which systemd does not
    restart), name it, never echo a secret key, and leave no authenticator thread behind."""
    secret_key = keys["server_secret"]
    secret = load_keys(secret_key, secret=True)[1]
    assert secret is not None
    if kind == "client":
        bad = keys["clients"] / "broken.key"
        bad.write_text(BROKEN_CLIENT_KEYS[case])
    else:
        bad = secret_key
        BROKEN_SECRETS[case](bad, tmp_path)
    cfg = PublishConfig(endpoint=endpoint, curve_secret_key=secret_key, curve_clients=keys["clients"])
    before = _authenticators()
    with pytest.raises(ConfigError) as started, Publisher(cfg):
        pass
    assert str(bad) in str(started.value) and secret.decode() not in str(started.value)
    assert _authenticators() == before
    with pytest.raises(ConfigError, match=str(bad)):
        check_curve(cfg)
    settings = {"publish.curve_secret_key": secret_key, "publish.curve_clients": keys["clients"]}
    code = main(["check-config", *(arg for k, v in settings.items() for arg in ("--set", f"{k}={v}"))])
    assert code == EXIT_CONFIG
    assert str(bad) in capsys.readouterr().err


def test_a_key_pair_zeromq_refuses_is_a_config_error_and_stops_the_authenticator(
    keys: dict[str, Path], endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should a key get past the checks as read, libzmq's EINVAL when it is set on the socket is still exit 78,
    and the authenticator thread, started by then, is stopped."""
    public, _ = load_keys(keys["server_secret"], secret=True)
    monkeypatch.setattr(curve, "load_keys", lambda path, secret: (public, b"~" * 40))  # ~ is not Z85
    cfg = PublishConfig(endpoint=endpoint, curve_secret_key=keys["server_secret"], curve_clients=keys["clients"])
    before = _authenticators()
    with pytest.raises(ConfigError, match="ZeroMQ refuses"), Publisher(cfg):
        pass
    assert _authenticators() == before


def test_daemon_exits_78_on_a_malformed_client_key(base: dict[str, object], keys: dict[str, Path]) -> None:
    (keys["clients"] / "broken.key").write_text(BROKEN_CLIENT_KEYS["colon, no ="])
    settings = {
        **base,
        "publish.curve_secret_key": str(keys["server_secret"]),
        "publish.curve_clients": str(keys["clients"]),
    }
    code, err = finish(start_daemon(settings))
    assert code == EXIT_CONFIG, err
    assert str(keys["clients"] / "broken.key") in err and "Traceback" not in err


def test_a_secret_key_others_can_read_is_warned_about_once(
    keys: dict[str, Path], endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = PublishConfig(endpoint=endpoint, curve_secret_key=keys["server_secret"], curve_clients=keys["clients"])
    keys["server_secret"].chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="eyed.curve"), Publisher(cfg) as pub:
        pub.reload_clients()  # a SIGHUP reads the allow-list only: no second warning
    warnings = [r for r in caplog.records if "readable by" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert str(keys["server_secret"]) in warnings[0].getMessage() and "its group and others" in warnings[0].getMessage()
    caplog.clear()
    keys["server_secret"].chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="eyed.curve"), Publisher(cfg):
        pass
    assert "readable by" not in caplog.text


def _wait_until(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_refused_key_is_logged_at_warning_once_a_minute(
    keys: dict[str, Path], endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    """After the wait for subscribers too (no monitor then): the allow-list names the key it turned away, once,
    and counts the next ones instead of logging each."""
    cfg = PublishConfig(endpoint=endpoint, curve_secret_key=keys["server_secret"], curve_clients=keys["clients"])
    stranger = load_keys(keys["stranger_secret"], secret=False)[0].decode()
    with caplog.at_level(logging.WARNING, logger="eyed.curve"), Publisher(cfg) as pub:
        pub.send("label.cam", {"seq": 0})  # the first event ends what the wait watches
        assert pub._curve is not None
        refusals = pub._curve.refusals
        for attempt in range(3):
            with Subscriber(pub.endpoint, ("label.",), (keys["stranger_secret"], keys["server_pub"])):
                # Refused: the first one logged, the others counted.
                _wait_until(functools.partial(_refused, caplog, stranger, refusals, attempt))
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1 and refused[0].levelno == logging.WARNING
    assert stranger in refused[0].getMessage() and str(keys["clients"]) in refused[0].getMessage()


def _refused(caplog: pytest.LogCaptureFixture, key: str, refusals: RefusalLog, suppressed: int) -> bool:
    """Whether ``key``'s refusal is in the log and ``suppressed`` later ones have been counted."""
    return key in caplog.text and sum(refusals._suppressed.values()) == suppressed


def test_the_wait_logs_subscribers_turned_away_before_the_key_check(
    keys: dict[str, Path], endpoint: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A wrong server key or no CURVE at all fails before any key is checked; only the wait's monitor sees it.
    The wrong server key's client retries ten times a second: one line, and a count when the wait ends."""
    fake_server, _ = create_keys(tmp_path / "fake", "fake")
    cfg = PublishConfig(endpoint=endpoint, curve_secret_key=keys["server_secret"], curve_clients=keys["clients"])
    with (
        caplog.at_level(logging.WARNING, logger="eyed.curve"),
        Publisher(cfg) as pub,
        Subscriber(pub.endpoint, ("label.",), (keys["allowed_secret"], fake_server)),
        Subscriber(pub.endpoint, ("label.",)),
        pytest.raises(PublishError),
    ):
        pub.wait_for_subscribers(1, 2)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    wrong_key = [m for m in messages if "wrong server key" in m]
    assert len([m for m in wrong_key if "refused a subscriber" in m]) == 1
    assert any(re.search(r"refused \d+ more subscriber", m) for m in wrong_key)
    # The subscriber without CURVE: a mechanism mismatch, or the connection closed first, whichever side reads
    # the other's greeting first.
    assert any("does not use CURVE" in m or "without CURVE" in m for m in messages), messages


def test_refusals_are_logged_once_per_reason_and_interval(caplog: pytest.LogCaptureFixture) -> None:
    log = RefusalLog(every_s=0.3)
    with caplog.at_level(logging.WARNING, logger="eyed.curve"):
        for _ in range(3):
            log.refused("reason a", ": key1")
        log.refused("reason b")
        time.sleep(0.4)
        log.refused("reason a", ": key2")
        log.refused("reason a", ": key3")
        log.flush()
    assert [r.getMessage() for r in caplog.records] == [
        "CURVE: refused a subscriber: reason a: key1",
        "CURVE: refused a subscriber: reason b",
        "CURVE: refused a subscriber: reason a: key2 (2 more refused for this reason since the last such warning)",
        "CURVE: refused 1 more subscriber(s) since the last warning: reason a",
    ]


def test_a_group_readable_secret_key_is_warned_about(
    keys: dict[str, Path], endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    keys["server_secret"].chmod(0o640)
    cfg = PublishConfig(endpoint=endpoint, curve_secret_key=keys["server_secret"], curve_clients=keys["clients"])
    with caplog.at_level(logging.WARNING, logger="eyed.curve"), Publisher(cfg):
        pass
    assert "readable by its group" in caplog.text
