"""CURVE on the event socket: only subscribers whose public key is allowed receive anything."""

from __future__ import annotations

import logging
import signal
import stat
import threading
from pathlib import Path

import pytest

from eyed.cli import EXIT_CONFIG, EXIT_OK, main
from eyed.config import ConfigError, PublishConfig
from eyed.curve import CurveError, create_keys
from eyed.daemon import reload_now
from eyed.publisher import Publisher, PublishError
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


def test_a_broken_allow_list_on_reload_keeps_the_previous_one(
    keys: dict[str, Path], endpoint: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
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
            broken.write_text("not a certificate\n")
            reload = threading.Event()
            reload.set()
            with caplog.at_level(logging.ERROR, logger="eyed.daemon"):
                reload_now(reload, notifier, pub)
            assert "cannot read the client keys" in caplog.text and "previous allow-list stays in force" in caplog.text
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
