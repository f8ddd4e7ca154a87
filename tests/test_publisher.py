"""The XPUB publisher and the SUB client, on real sockets (free TCP ports and ipc files in tmp_path)."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from eyed import publisher as publisher_module
from eyed.cli import EXIT_CONFIG
from eyed.config import ConfigError, PublishConfig
from eyed.publisher import INBOUND_HWM, MAX_INBOUND_BYTES, Publisher, PublishError, check_ipc_free, encode
from eyed.subscriber import MAX_TIMEOUT_S, Subscriber
from tests.conftest import ROOT

PAYLOAD = {"schema": 1, "type": "label", "seq": 1, "label": "tabby, tabby cat", "score": 0.5, "coarse": None}


@pytest.fixture(params=["tcp", "ipc"])
def any_endpoint(request: pytest.FixtureRequest, endpoint: str, tmp_path: Path) -> str:
    return endpoint if request.param == "tcp" else f"ipc://{tmp_path / 'eyed.sock'}"


def publisher(endpoint: str, event_topics: tuple[str, ...] | None = None, **kwargs: Any) -> Publisher:
    return Publisher(PublishConfig(endpoint=endpoint, linger_ms=0, **kwargs), event_topics=event_topics)


def drain(sub: Subscriber, quiet_s: float = 0.5) -> int:
    """Receive until nothing arrives for ``quiet_s``; returns how many messages came."""
    received = 0
    while True:
        try:
            sub.receive(quiet_s)
        except TimeoutError:
            return received
        received += 1


class LateSubscriber(threading.Thread):
    """A real Subscriber that connects from its own thread once the publisher is already waiting for it.

    Connecting after the wait has started is the daemon's usual order (the test below covers the other one);
    the delay orders the two, it is never asserted on.
    """

    def __init__(self, endpoint: str, topics: tuple[str, ...] = ("",), expect: int = 1, delay_s: float = 0.3):
        super().__init__(daemon=True)
        self.endpoint, self.topics, self.expect, self.delay_s = endpoint, topics, expect, delay_s
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        time.sleep(self.delay_s)
        try:
            with Subscriber(self.endpoint, self.topics) as sub:
                while len(self.received) < self.expect:
                    self.received.append(sub.receive(10))
                with pytest.raises(TimeoutError):
                    sub.receive(0.2)  # nothing more, e.g. nothing the topic filter should have dropped
        except BaseException as exc:  # reported by the test thread
            self.error = exc

    def result(self) -> list[tuple[str, dict[str, Any]]]:
        self.join(30)
        assert not self.is_alive()
        if self.error is not None:
            raise self.error
        return self.received


def await_subscriptions(pub: Publisher, count: int = 1, timeout_s: float = 10) -> None:
    """Block until ``count`` subscriptions reached the XPUB socket (after which sends are delivered)."""
    drain_until(pub, lambda: pub.subscriptions >= count, timeout_s)


def drain_until(pub: Publisher, done: Callable[[], bool], timeout_s: float = 10) -> None:
    """Read (un)subscription messages as they reach the XPUB socket until ``done()``."""
    assert pub.socket is not None
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "the (un)subscription never arrived"
        pub.socket.poll(100, zmq.POLLIN)
        pub.drain_subscriptions()


def test_wait_for_a_subscriber_then_deliver(any_endpoint: str) -> None:
    with publisher(any_endpoint) as pub:
        late = LateSubscriber(any_endpoint)
        late.start()
        pub.wait_for_subscribers(1, timeout_s=10)
        assert pub.subscriptions >= 1
        # No slow-joiner loss: the very first message after the wait arrives.
        pub.send("label.cam", PAYLOAD)
        assert late.result() == [("label.cam", PAYLOAD)]
    assert pub.sent == 1


def test_wait_for_two_subscribers(endpoint: str) -> None:
    with publisher(endpoint) as pub:
        subs = [LateSubscriber(endpoint, delay_s=d) for d in (0.2, 0.4)]
        for s in subs:
            s.start()
        pub.wait_for_subscribers(2, timeout_s=10)
        pub.send("label.cam", PAYLOAD)
        assert [s.result() for s in subs] == [[("label.cam", PAYLOAD)]] * 2


def test_wait_counts_a_subscriber_that_connected_before_the_call(endpoint: str) -> None:
    with publisher(endpoint) as pub, Subscriber(endpoint) as sub:
        assert pub.socket is not None
        # The subscription message is queued on the XPUB socket: the peer is fully connected.
        assert pub.socket.poll(10_000, zmq.POLLIN)
        pub.wait_for_subscribers(1, timeout_s=1)
        pub.send("label.cam", PAYLOAD)
        assert sub.receive(5) == ("label.cam", PAYLOAD)


def test_topic_prefix_filter(endpoint: str) -> None:
    with publisher(endpoint) as pub, Subscriber(endpoint, ("health.",)) as sub:
        await_subscriptions(pub)
        pub.send("label.cam", PAYLOAD)
        pub.send("health.cam", {"type": "health", "state": "live"})
        topic, payload = sub.receive(5)
        assert topic == "health.cam"
        assert payload["state"] == "live"
        with pytest.raises(TimeoutError):
            sub.receive(0.2)


def test_wildcard_port_resolves_to_the_bound_endpoint() -> None:
    with publisher("tcp://127.0.0.1:*") as pub:
        assert pub.endpoint.startswith("tcp://127.0.0.1:")
        assert not pub.endpoint.endswith(":*")
        with Subscriber(pub.endpoint) as sub:
            await_subscriptions(pub)
            pub.send("t", {"n": 1})
            assert sub.receive(5) == ("t", {"n": 1})


@pytest.mark.parametrize("kind", ["tcp", "ipc"])
def test_wait_times_out(kind: str, endpoint: str, tmp_path: Path) -> None:
    ep = endpoint if kind == "tcp" else f"ipc://{tmp_path / 'lonely.sock'}"
    with (
        publisher(ep) as pub,
        pytest.raises(PublishError, match=re.escape("publish.wait_subscribers")) as info,
    ):
        pub.wait_for_subscribers(1, timeout_s=0.5)
    assert "publish.wait_timeout_s" in str(info.value)


def test_a_health_probe_is_no_subscriber_to_wait_for(endpoint: str) -> None:
    """`eyed health` subscribes to heartbeats only: with publish.wait_subscribers=1 it must not set a replay
    streaming its labels to nobody. A reader of labels (or of everything, or of drift) counts."""
    with publisher(endpoint) as pub, Subscriber(endpoint, ("health.",)):
        await_subscriptions(pub)
        with pytest.raises(PublishError, match="only 0 subscriber"):
            pub.wait_for_subscribers(1, timeout_s=0.5)
    for topics in [("",), ("label.cam",), ("drift.",), ("l",)]:
        with publisher(endpoint) as pub, Subscriber(endpoint, ("health.", *topics)):
            pub.wait_for_subscribers(1, timeout_s=10)
            assert pub.event_subscriptions == 1 and pub.subscriptions == 2


def test_a_subscriber_to_another_sources_events_is_no_subscriber_to_wait_for(endpoint: str) -> None:
    """Told its own topics (the daemon's label and drift topics), the publisher counts only subscriptions that let
    them in: a reader of another camera's labels (label.door for the source shelf, or label.shelf2) satisfied
    publish.wait_subscribers, and the replay streamed to nobody."""
    own = ("label.shelf", "drift.shelf")
    for topics in [("label.door",), ("label.shelf2",), ("drift.door",), ("health.shelf",)]:
        with publisher(endpoint, event_topics=own) as pub, Subscriber(endpoint, topics):
            await_subscriptions(pub)
            with pytest.raises(PublishError, match="only 0 subscriber"):
                pub.wait_for_subscribers(1, timeout_s=0.3)
    for topics in [("",), ("label.",), ("label.shelf",), ("drift.sh",), ("l",)]:
        with publisher(endpoint, event_topics=own) as pub, Subscriber(endpoint, topics):
            pub.wait_for_subscribers(1, timeout_s=10)
            assert pub.event_subscriptions == 1


def test_wait_for_zero_subscribers_returns_at_once(endpoint: str) -> None:
    with publisher(endpoint) as pub:
        pub.wait_for_subscribers(0, timeout_s=0.01)
        assert pub.subscriptions == 0


def test_wait_ends_without_error_when_stopped(endpoint: str) -> None:
    stop = threading.Event()
    stop.set()
    with publisher(endpoint) as pub:
        pub.wait_for_subscribers(1, timeout_s=30, stop=stop)  # would raise after 30 s if stop were ignored


def test_binding_twice_fails(endpoint: str) -> None:
    with publisher(endpoint):
        with pytest.raises(PublishError, match=re.escape("publish.endpoint")) as info, publisher(endpoint):
            pass
        assert endpoint in str(info.value)


def test_endpoint_free_again_after_exit(endpoint: str) -> None:
    with publisher(endpoint):
        pass
    with publisher(endpoint) as pub:
        assert pub.socket is not None
    assert pub.socket is None


def test_send_with_no_subscriber_does_not_block(endpoint: str) -> None:
    with publisher(endpoint, hwm=10) as pub:
        for i in range(1000):
            pub.send("label.cam", {"seq": i})
    assert pub.sent == 1000


def test_slow_subscriber_does_not_block_the_publisher_and_sees_gaps(endpoint: str) -> None:
    """Past the high-water mark ZeroMQ drops for the slow subscriber; the publisher goes on, seq shows the loss."""
    with publisher(endpoint, hwm=10) as pub, Subscriber(endpoint) as sub:
        await_subscriptions(pub)
        for i in range(100_000):
            pub.send("label.cam", {"seq": i, "pad": "x" * 100})
        assert sub.socket is not None
        seqs = []
        while sub.socket.poll(500):
            seqs.append(sub.receive(1)[1]["seq"])
    assert pub.sent == 100_000
    assert 0 < len(seqs) < 100_000
    assert seqs == sorted(set(seqs)), "delivered events keep their order"
    assert any(b - a > 1 for a, b in itertools.pairwise(seqs)), "the loss is visible as a gap in seq"


def test_encode_is_compact_utf8_json() -> None:
    assert encode({"label": "café", "score": 0.5}) == '{"label":"café","score":0.5}'.encode()


def test_encode_takes_numpy_scalars_like_python_numbers() -> None:
    payload = {"score": np.float32(0.5), "n": np.int64(3), "rows": [np.float64(0.25)]}
    assert encode(payload) == b'{"score":0.5,"n":3,"rows":[0.25]}'


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), np.float32("nan"), np.float64("inf")])
@pytest.mark.parametrize(
    "where",
    [
        lambda v: {"score": v},
        lambda v: {"label": "cat", "topk": [{"label": "cat", "score": 0.5}, {"label": "dog", "score": v}]},
        lambda v: {"coarse": {"label": "cat", "score": v}, "truth": None, "frame": 3},
        lambda v: {"rows": (1, 2.0, [v])},
        lambda v: {"rows": np.array([0.5, v]).tolist()},
        lambda v: {"rows": np.array([[0.5, v]], dtype=np.float32)},  # orjson writes numpy arrays too
    ],
)
def test_encode_refuses_non_finite_numbers(bad: float, where: Any) -> None:
    with pytest.raises(ValueError):
        encode(where(bad))


def test_encode_repairs_text_that_is_not_utf8(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A class folder named in Latin-1 ("caf\\xe9") reaches Python with a surrogate; orjson refuses it with a
    TypeError, which ended the publishing thread. Now it goes out with U+FFFD, logged once per text."""
    monkeypatch.setattr(publisher_module, "_REPAIRED", set())  # whatever other tests repaired before
    label = b"caf\xe9".decode("utf-8", "surrogateescape")
    payload = {"label": label, "topk": [{"label": label, "score": 0.5}], "truth": label, "coarse": None}
    with caplog.at_level("WARNING", logger="eyed.publisher"):
        sent = [encode(payload) for _ in range(3)]
    expected = {"label": "caf\ufffd", "topk": [{"label": "caf\ufffd", "score": 0.5}], "truth": "caf\ufffd"}
    assert sent[0] == encode({**expected, "coarse": None})
    assert len([r for r in caplog.records if "not valid UTF-8" in r.getMessage()]) == 1
    # A UTF-8 name read as ASCII (a C locale) comes back whole; any other lone surrogate is replaced.
    assert encode({"a": "caf\u00e9".encode().decode("ascii", "surrogateescape"), "b": "x\ud800"}) == (
        '{"a":"caf\u00e9","b":"x\ufffd"}'.encode()
    )
    assert encode({"caf\udce9": 1}) == '{"caf\ufffd":1}'.encode()  # keys too


@pytest.mark.parametrize("bad", [{"n": 2**70}, {"obj": object()}, {1: "int key"}, {"rows": [{"x": {1, 2}}]}])
def test_encode_raises_value_error_for_what_json_cannot_carry(bad: dict[Any, Any]) -> None:
    """ValueError, like a NaN: the pipeline counts the event in ``errors`` and goes on (a TypeError killed it)."""
    with pytest.raises(ValueError, match="cannot be encoded as JSON"):
        encode(bad)


def test_send_delivers_repaired_text(endpoint: str) -> None:
    with publisher(endpoint) as pub, Subscriber(endpoint, ("label.",)) as sub:
        await_subscriptions(pub)
        pub.send("label.cam", {"label": "caf\udce9", "seq": 0})
        assert sub.receive(5) == ("label.cam", {"label": "caf\ufffd", "seq": 0})
    assert pub.sent == 1


def test_send_refuses_nan_and_counts_nothing(endpoint: str) -> None:
    with publisher(endpoint) as pub:
        with pytest.raises(ValueError):
            pub.send("label.cam", {"score": float("nan")})
        assert pub.sent == 0


def test_receive_times_out(endpoint: str) -> None:
    with Subscriber(endpoint) as sub, pytest.raises(TimeoutError, match="no event"):
        sub.receive(0.2)


def test_receive_times_out_when_nothing_is_sent(endpoint: str) -> None:
    with publisher(endpoint) as pub, Subscriber(endpoint) as sub:
        await_subscriptions(pub)
        with pytest.raises(TimeoutError):
            sub.receive(0.2)


@pytest.mark.timeout(30)  # without the check, a huge wait is waited (on HEAD: read in 1 s steps, for ever)
@pytest.mark.parametrize("timeout_s", [-1.0, MAX_TIMEOUT_S + 1, 1e300, float("inf"), float("nan")])
def test_receive_refuses_a_timeout_zeromq_cannot_wait(endpoint: str, timeout_s: float) -> None:
    """ZeroMQ's poll takes milliseconds as a C int: a wait past about 24.8 days would overflow, a negative one
    waits for ever. The Subscriber says so itself, as a library caller gets no argparse check. Without this,
    dropping the upper bound went unseen (the caller then waits for ever, or gets an OverflowError)."""
    with Subscriber(endpoint) as sub, pytest.raises(ValueError, match="expected 0 to"):
        sub.receive(timeout_s)


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize(
    "make",
    [
        lambda port, tmp: f"tcp://*:{port}",
        lambda port, tmp: f"tcp://0.0.0.0:{port}",
        lambda port, tmp: f"tcp://lo:{port}",
        lambda port, tmp: f"tcp://[::1]:{port}",
        lambda port, tmp: f"ipc://{tmp / 'events.sock'}",
        lambda port, tmp: f"ipc://@eyed-test-{port}",
    ],
)
def test_endpoints_the_config_accepts_bind_and_deliver(make: Any, tmp_path: Path) -> None:
    from tests.conftest import free_port

    endpoint = make(free_port(), tmp_path)
    if "[::1]" in endpoint and not has_ipv6_loopback():  # pragma: no cover
        pytest.skip("no IPv6 loopback on this machine")
    with publisher(endpoint) as pub:
        connect = pub.endpoint.replace("0.0.0.0", "127.0.0.1")
        with Subscriber(connect) as sub:
            await_subscriptions(pub)
            pub.send("label.cam", PAYLOAD)
            assert sub.receive(5) == ("label.cam", PAYLOAD)


def test_an_endpoint_zeromq_cannot_parse_is_a_config_error() -> None:
    """Should a malformed endpoint get past the config's check, ZeroMQ's EINVAL still means exit 78: no
    restart makes it parse."""
    cfg = PublishConfig.model_construct(**{**PublishConfig().model_dump(), "endpoint": "tcp://127.0.0.1:notaport"})
    with pytest.raises(ConfigError, match=re.escape("publish.endpoint tcp://127.0.0.1:notaport")), Publisher(cfg):
        pass


def test_an_interface_that_is_not_there_yet_may_heal(tmp_path: Path) -> None:
    """ENODEV (an interface not up yet) and ENOENT (a runtime folder not made yet) stay exit 69: a restart
    can find them; EADDRINUSE likewise (test_binding_twice_fails)."""
    for endpoint in ("tcp://nosuchif0:5556", f"ipc://{tmp_path / 'not-yet' / 'events.sock'}"):
        with pytest.raises(PublishError, match=re.escape(f"publish.endpoint {endpoint}")), publisher(endpoint):
            pass


def connects_as_nobody(path: Path) -> bool:
    """Whether a process of user and group nobody can connect to the unix socket ``path`` (forked, not run:
    nobody could not exec this venv's interpreter, which lives under /root)."""
    pid = os.fork()
    if pid == 0:  # the child: only system calls until _exit
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(path))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def test_an_ipc_socket_lets_other_users_subscribe() -> None:
    """The unit's umask (0027) would make the socket file 0750, and connecting takes write permission: a
    subscriber running as another user must still get in, as it would over tcp on the loopback."""
    # Not under tmp_path: pytest's folders are 0700, which nobody cannot pass.
    with tempfile.TemporaryDirectory(prefix="eyed-run-") as run:
        os.chmod(run, 0o755)
        path = Path(run) / "events.sock"
        old = os.umask(0o027)
        try:
            with publisher(f"ipc://{path}"):
                os.umask(old)
                assert stat.S_IMODE(path.stat().st_mode) == 0o666
                if os.geteuid() == 0:
                    assert connects_as_nobody(path)
        finally:
            os.umask(old)


def test_ipc_mode_can_keep_the_socket_to_the_daemons_group(tmp_path: Path) -> None:
    path = tmp_path / "events.sock"
    with publisher(f"ipc://{path}", ipc_mode="0660"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o660


CHURN = r"""
import socket, sys, time
from eyed.config import PublishConfig
from eyed.publisher import Publisher
from eyed.subscriber import Subscriber

endpoint = sys.argv[1]
host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
with Publisher(PublishConfig(endpoint=endpoint, linger_ms=0)) as pub, Subscriber(endpoint, ("",)) as keeper:
    pub.wait_for_subscribers(1, 10)
    # A port scan, a monitoring job's short visits: each connection used to leave two events on a monitor
    # nobody read after the wait; at about 2,000 ZeroMQ's I/O thread blocked, and nobody got events any more.
    for _ in range(2500):
        with socket.create_connection((host, int(port))):
            pass
    for seq in range(50):
        pub.send("label.cam", {"seq": seq})
    got = []
    while len(got) < 50:
        got.append(keeper.receive(10)[1]["seq"])
    assert got == list(range(50)), got
print("delivered")
"""


@pytest.mark.timeout(120)
def test_events_keep_flowing_after_thousands_of_connections(endpoint: str) -> None:
    """In a child process: before the fix, closing the publisher then hung for ever holding the GIL."""
    result = subprocess.run(
        [sys.executable, "-c", CHURN, endpoint], capture_output=True, text=True, timeout=90, cwd=ROOT
    )
    assert result.returncode == 0 and result.stdout.strip() == "delivered", result.stderr[-2000:]


def test_a_long_subscription_disconnects_its_sender(endpoint: str) -> None:
    """Subscription messages are read only while waiting for subscribers; past that, a peer sending megabytes
    of them could park memory in the daemon. Longer than MAX_INBOUND_BYTES, ZeroMQ drops the peer."""
    with publisher(endpoint) as pub, Subscriber(endpoint, ("label.",)) as ok:
        pub.wait_for_subscribers(1, timeout_s=10)
        big: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.SUB)
        try:
            big.setsockopt(zmq.SUBSCRIBE, b"x" * (MAX_INBOUND_BYTES + 1))
            big.connect(endpoint)
            time.sleep(0.5)
            pub.send("x" * (MAX_INBOUND_BYTES + 1), {"n": 1})
            assert not big.poll(500)
        finally:
            big.close(linger=0)
        pub.send("label.cam", PAYLOAD)
        assert ok.receive(5) == ("label.cam", PAYLOAD)


def test_a_second_publisher_on_a_live_ipc_path_is_refused(tmp_path: Path) -> None:
    """ZeroMQ would delete the first one's socket file and bind: the first would run on, out of reach."""
    ep = f"ipc://{tmp_path / 'eyed.sock'}"
    with publisher(ep) as first:
        with pytest.raises(PublishError, match="in use by another process"), publisher(ep):
            pass
        with Subscriber(ep, ("label.",)) as sub:
            await_subscriptions(first)
            first.send("label.cam", PAYLOAD)
            assert sub.receive(5) == ("label.cam", PAYLOAD)
    # A stale socket (a crashed daemon's: bound, never unlinked, nobody listening) is no obstacle.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as crashed:
        crashed.bind(str(tmp_path / "stale.sock"))
    with publisher(f"ipc://{tmp_path / 'stale.sock'}") as pub, Subscriber(pub.cfg.endpoint, ("label.",)) as sub:
        await_subscriptions(pub)
        pub.send("label.cam", PAYLOAD)
        assert sub.receive(5) == ("label.cam", PAYLOAD)


@pytest.mark.parametrize("kind", ["file", "folder", "symbolic link"])
def test_an_ipc_path_that_is_not_a_socket_is_refused_and_kept(tmp_path: Path, kind: str) -> None:
    """ZeroMQ deletes whatever is at an ipc:// path before binding: an endpoint naming eyed.toml by mistake
    lost the file. A configuration error instead (exit 78), in `eyed check-config` too, and the file stays."""
    target = tmp_path / "eyed.toml"
    target.write_text("[source]\n")
    path = {"file": target, "folder": tmp_path, "symbolic link": tmp_path / "link"}[kind]
    if kind == "symbolic link":
        path.symlink_to(target)
    endpoint = f"ipc://{path}"
    with pytest.raises(ConfigError, match=f"is a {kind}, not a socket"), publisher(endpoint):
        pass
    check = subprocess.run(
        [sys.executable, "-m", "eyed", "check-config", "--set", f"publish.endpoint={endpoint}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == EXIT_CONFIG and f"is a {kind}, not a socket" in check.stderr, check.stderr
    assert target.read_text() == "[source]\n" and path.exists()


def test_a_socket_file_held_by_a_process_that_never_accepts_counts_as_in_use(tmp_path: Path) -> None:
    """A wedged listener (its backlog full) must not hang the second daemon's start: in use, exit 69."""
    path = str(tmp_path / "wedged.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(0)
        fillers = []
        for _ in range(3):
            filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(path)
            fillers.append(filler)
        try:
            with pytest.raises(PublishError, match="in use"):
                check_ipc_free(f"ipc://{path}")
        finally:
            for filler in fillers:
                filler.close()


FLOOD = r"""
import sys, time, zmq
sock = zmq.Context().socket(zmq.XSUB)
sock.connect(sys.argv[1])
end = time.monotonic() + float(sys.argv[2])
print("flooding", flush=True)
while time.monotonic() < end:
    sock.send(b"\x01label.flood")
    sock.send(b"\x00label.flood")
sock.close(linger=0)
"""


@contextlib.contextmanager
def flooding(pub: Publisher, seconds: float = 30) -> Iterator[subprocess.Popen[str]]:
    """A client, in a process of its own, that subscribes to one topic and unsubscribes without pause (the
    subscription set never grows: every message still reaches the XPUB socket's reader)."""
    assert pub.socket is not None
    proc = subprocess.Popen(
        [sys.executable, "-c", FLOOD, pub.endpoint, str(seconds)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "flooding"
        assert pub.socket.poll(10_000, zmq.POLLIN), "the flood never arrived"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_subscription_flood_does_not_hold_up_sends(endpoint: str, caplog: pytest.LogCaptureFixture) -> None:
    """Reading subscriptions inline in send() had no bound: one send took as long as such a flood lasted, and
    labels and heartbeats stopped. Each read now has a budget; the bound asserted is generous on purpose."""
    with publisher(endpoint) as pub, Subscriber(endpoint, ("label.cam",)) as sub:
        await_subscriptions(pub)
        with caplog.at_level("WARNING", logger="eyed.publisher"), flooding(pub) as flood:
            slowest = 0.0
            for seq in range(15):  # 1.5 s: past DISCARD_EVERY_S, so more than one send reads subscriptions
                start = time.monotonic()
                pub.send("label.cam", {"seq": seq})
                slowest = max(slowest, time.monotonic() - start)
                time.sleep(0.1)
            assert flood.poll() is None, "the flood is still on"
            assert slowest < 0.5
            assert [sub.receive(5)[1]["seq"] for _ in range(15)] == list(range(15))


def test_a_drain_cut_short_is_logged_once_a_minute(
    endpoint: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ZeroMQ taking in INBOUND_HWM messages per peer at a time, one flooder rarely fills a read's budget;
    many would. A budget of two messages stands in for them: the rest is read at the next send."""
    monkeypatch.setattr(publisher_module, "DRAIN_MAX_MESSAGES", 2)
    with publisher(endpoint) as pub, Subscriber(endpoint, ("label.cam",)) as sub:
        await_subscriptions(pub)
        with caplog.at_level("WARNING", logger="eyed.publisher"), flooding(pub):
            for seq in range(10):
                pub.send("label.cam", {"seq": seq})
                time.sleep(0.02)
            assert [sub.receive(5)[1]["seq"] for _ in range(10)] == list(range(10))
    warnings = [r for r in caplog.records if "faster than they are read" in r.getMessage()]
    assert len(warnings) == 1


def test_the_wait_for_subscribers_keeps_ticking_through_a_flood(endpoint: str) -> None:
    """The wait reads subscriptions too: a flood must not keep it from its ticks (the daemon's watchdog pings),
    its stop event or its deadline."""
    with publisher(endpoint) as pub, flooding(pub) as flood:
        stop = threading.Event()
        ticks: list[float] = []

        def tick() -> None:
            ticks.append(time.monotonic())
            if len(ticks) == 5:
                stop.set()

        start = time.monotonic()
        pub.wait_for_subscribers(2, timeout_s=20, stop=stop, tick=tick)
        assert time.monotonic() - start < 5 and flood.poll() is None
        assert pub.peers == 1  # the flooder, a peer like any other


def test_a_subscriber_with_many_topics_gets_every_one(endpoint: str) -> None:
    """ZeroMQ takes in INBOUND_HWM subscription messages from a peer at a time: more are only slowed down."""
    topics = tuple(f"label.cam{i}" for i in range(8 * INBOUND_HWM))
    with publisher(endpoint) as pub, Subscriber(endpoint, topics) as sub:
        pub.send("label.cam0", {"n": 0})  # no wait: what it watches is off
        deadline = time.monotonic() + 10
        while True:
            assert time.monotonic() < deadline, "the last topic's subscription never came through"
            pub.send(topics[-1], {"n": 1})
            with contextlib.suppress(TimeoutError):
                if sub.receive(0.1)[0] == topics[-1]:
                    break


def test_a_subscriber_that_unsubscribed_is_not_waited_for(endpoint: str) -> None:
    """Subscribed, then unsubscribed and still connected: a replay waiting for it would stream to nobody."""
    with publisher(endpoint) as pub, Subscriber(endpoint, ("label.",)) as sub:
        await_subscriptions(pub)
        assert sub.socket is not None
        sub.socket.setsockopt(zmq.UNSUBSCRIBE, b"label.")
        drain_until(pub, lambda: pub.event_subscriptions == 0)
        with pytest.raises(PublishError, match="only 0 subscriber"):
            pub.wait_for_subscribers(1, timeout_s=0.5)
