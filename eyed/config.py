"""Settings: every option defined once, read from defaults, a TOML file and ``EYED_`` environment variables.

Precedence, highest first: explicit overrides (``--set section.field=value`` on the command line), environment
variables (``EYED_SOURCE__LIMIT=100``), the TOML file given with ``--config``, then the defaults below.
Validators only check; they never mutate other fields or touch the disk.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import os
import re
import socket
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

ENV_PREFIX = "EYED_"
# The shipped unit's TimeoutStopSec: systemd kills eyed this long after SIGTERM, bounded shutdown or not.
UNIT_STOP_TIMEOUT_S = 20.0
# What a stop takes besides daemon.shutdown_timeout_s and publish.linger_ms: a camera's capture thread gets up
# to 2 s to end (sources.capture.EXIT_JOIN_S), then the model and the interpreter close.
STOP_MARGIN_S = 3.0
# sockaddr_un.sun_path holds 108 bytes with the closing NUL; ZeroMQ refuses longer ipc paths at bind.
IPC_PATH_MAX = 107
# An interface (eth0, br-lan, eth0.100) or a host name: what ZeroMQ resolves when binding.
_INTERFACE = re.compile(r"[A-Za-z0-9_.\-]+")


def default_cache_dir() -> Path:
    """model.cache_dir's default: the folder systemd made for the service (CacheDirectory=, passed on as
    $CACHE_DIRECTORY; the first, if it lists several), else the user's. A default, not an override, so that a
    cache_dir in the TOML file wins (the unit used to set EYED_MODEL__CACHE_DIR, which beat the file)."""
    folder = os.environ.get("CACHE_DIRECTORY", "").split(":")[0]
    return Path(folder) if folder else Path("~/.cache/eyed")


class Section(BaseModel):
    """A config section: unknown keys are errors, values are checked on assignment too."""

    # Defaults validated too: a default path starting with ~ is expanded like a given one.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)

    @field_validator("*", mode="before")
    @classmethod
    def _empty_text(cls, value: Any, info: ValidationInfo) -> Any:
        # `--set model.onnx=` or EYED_MODEL__ONNX= is the only way to clear an option that the file sets;
        # pydantic would read "" as the path "." (the working directory).
        if value == "" and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            if type(None) in get_args(annotation):
                return None
            if annotation is Path:
                raise ValueError("empty: give a path")
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _home(cls, value: Any) -> Any:
        # A shell expands ~ only at the start of a word, never inside a TOML file or after --set key=.
        return value.expanduser() if isinstance(value, Path) else value


class SourceConfig(Section):
    kind: Literal["replay", "webcam", "rtsp", "file"] = Field("replay", description="Where frames come from.")
    dataset: str = Field(
        "uoft-cs/cifar10",
        min_length=1,
        description="Replay: Hugging Face hub id or a local folder of parquet shards.",
    )
    split: str = Field("test", min_length=1, description="Replay: dataset split.")
    url: str | None = Field(None, min_length=1, description="rtsp: the stream URL; file: the video file's path.")
    device: int | str | None = Field(None, description="webcam: index (0) or device path (/dev/video0).")
    width: int | None = Field(None, gt=0, description="webcam: frame width to request.")
    height: int | None = Field(None, gt=0, description="webcam: frame height to request.")
    transport: Literal["tcp", "udp"] = Field("tcp", description="rtsp: RTP transport.")
    limit: int = Field(
        0, ge=0, description="Stop after this many frames (cameras too: then 'finished', exit 0); 0 = all."
    )
    skip: int = Field(0, ge=0, description="Replay: skip this many records first (e.g. to reach held-out ones).")
    fps: float = Field(
        0.0,
        ge=0.0,
        description="replay/file: pace frames to this rate (0 = as fast as the model goes); webcam/rtsp: take at "
        "most this many frames a second, the newest each time (webcam: also requested from the driver); 0 = all.",
    )
    loop: bool = Field(False, description="replay/file: start again at the end instead of finishing.")
    id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_\-]+$",
        description="Name used in topics (label.<id>); derived from the source when unset.",
    )
    image_column: str | None = Field(None, description="Replay: image column; auto-detected when unset.")
    label_column: str | None = Field(None, description="Replay: label column; auto-detected when unset.")
    open_timeout_s: float = Field(10.0, gt=0, le=300, description="Camera: give up opening after this long.")
    read_timeout_s: float = Field(5.0, gt=0, le=300, description="Camera: give up one read after this long.")
    stall_s: float = Field(
        10.0, gt=0, description="Camera: seconds without a new frame (or with frozen frames) before 'stalled'."
    )
    freeze_diff: float = Field(
        0.5,
        ge=0,
        description="Camera: mean absolute difference (0-255) between consecutive frames, over a grid of single "
        "grey pixels (no averaging, so sensor noise counts), under which they count as frozen; 0 turns "
        "frozen-frame detection off.",
    )
    reconnect_initial_s: float = Field(0.5, gt=0, description="Camera: first delay before reconnecting.")
    reconnect_max_s: float = Field(30.0, gt=0, description="Camera: cap of the exponential reconnect backoff.")

    @model_validator(mode="after")
    def _check_kind_fields(self) -> SourceConfig:
        if self.kind in ("rtsp", "file") and not self.url:
            raise ValueError(f"source.url is required when source.kind is '{self.kind}'")
        if self.kind == "rtsp" and self.url and not self.url.startswith(("rtsp://", "rtsps://")):
            raise ValueError("source.url must start with rtsp:// when source.kind is 'rtsp'")
        if self.kind == "rtsp" and self.url:
            try:
                urlsplit(self.url).port  # noqa: B018 (parsed for its errors: an unclosed [, a port not a number)
            except ValueError as exc:
                raise ValueError(f"source.url is not a valid URL: {exc}") from None
        if self.kind == "webcam" and self.device is None:
            raise ValueError("source.device is required when source.kind is 'webcam' (e.g. 0 or /dev/video0)")
        if self.reconnect_initial_s > self.reconnect_max_s:
            raise ValueError("source.reconnect_initial_s is larger than source.reconnect_max_s")
        return self

    def resolved_id(self) -> str:
        """The source name used in topics: ``id`` if set, else derived from what the source reads."""
        if self.id:
            return self.id
        if self.kind == "replay":
            raw = f"{Path(self.dataset.rstrip('/')).name or 'replay'}-{self.split}"
        elif self.kind == "webcam":
            raw = f"webcam-{Path(str(self.device)).name}"
        elif self.kind == "file":
            url = str(self.url)
            # A file can be a URL too (a stream FFmpeg reads, an rtsp:// given by mistake): no secrets in topics.
            # A plain path keeps the name it always had ('#', ':' and '@' are just characters in it).
            raw = Path(_id_part(url) if URL_SCHEME.match(url) else url).stem
        else:  # rtsp: host, port, path and query, without the user info or secret items
            raw = "rtsp/" + _id_part(str(self.url))
        return re.sub(r"[^A-Za-z0-9_\-]+", "-", raw).strip("-") or self.kind


# A URL's scheme and "//", as opposed to a file's path.
URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
# name=value items of a URL's query, or of its path: some cameras (XMEye) take
# /user=admin&password=...&channel=1 there.
URL_ITEM = re.compile(r"([^/&;?#=]+)=([^/&;?#]*)")
# Names of items whose values are secrets: passwords (cameras' CGI spellings too: pwd, pw, psw), tokens,
# keys, signed URLs' sig/signature.
SECRET_NAME = re.compile(r"pass|pwd|pw|psw|token|secret|key|auth|sig|credential", re.IGNORECASE)
# Left out of a source's id altogether (it is in every topic): secrets, and who logs in (usr: Foscam's CGI).
ID_LEFT_OUT = re.compile(f"{SECRET_NAME.pattern}|user|usr|login|account", re.IGNORECASE)
# user:password@ wherever it appears, a URL with a mistyped scheme (rtsp//...) too; up to the last @ before
# the path, as a password may hold an @.
USER_PASSWORD = re.compile(r"([^\s/:@]*):[^\s/]*@")


def _id_part(url: str) -> str:
    """Host, port, path and query of ``url``, as written (a camera's host name keeps its case), without the
    user info, the fragment or items :data:`ID_LEFT_OUT` names. Not urlsplit: it refuses a malformed URL."""
    head = re.match(r"[A-Za-z][A-Za-z0-9+.\-]*:/*", url)
    rest = url[head.end() :] if head else url
    netloc = re.match(r"[^/?#]*", rest)
    assert netloc is not None  # matches the empty string at least
    tail = rest[netloc.end() :].split("#", 1)[0]
    return netloc[0].rpartition("@")[2] + URL_ITEM.sub(lambda m: "" if ID_LEFT_OUT.search(m[1]) else m[0], tail)


def redact_url(url: str) -> str:
    """``url`` with its password and the values of secret items (``password=``, ``token=``, ..., in the query
    or the path) replaced by ``***``, for messages and printouts. Works on malformed URLs too.

    The user name stays: "wrong user" is a common mistake, and it is not a secret on its own.
    """
    url = USER_PASSWORD.sub(r"\1:***@", url)
    return URL_ITEM.sub(lambda m: f"{m[1]}=***" if SECRET_NAME.search(m[1]) else m[0], url)


def _redacted(value: Any) -> Any:
    """A configuration value as it may be shown: the secrets of URLs in it hidden (:func:`redact_url`)."""
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redacted(v) for v in value)
    return value


class ModelConfig(Section):
    id: str = Field(
        "google/mobilenet_v2_1.0_224",
        min_length=1,
        description="Hugging Face hub id or local checkpoint folder.",
    )
    backend: Literal["onnx", "torch"] = Field("onnx", description="Inference runtime.")
    onnx: Path | None = Field(None, description="Exported ONNX file; exported into cache_dir when unset.")
    cache_dir: Path = Field(
        default_factory=default_cache_dir,
        description="Where the daemon keeps ONNX files it exported itself (default: $CACHE_DIRECTORY, which "
        "systemd sets from the unit's CacheDirectory=, else ~/.cache/eyed).",
    )
    topk: int = Field(5, ge=1, le=100, description="Classes listed in each label event.")
    threads: int = Field(
        0,
        ge=0,
        le=256,
        description="Intra-op threads per inference call; 0 = the cores this process may use, shared among "
        "model.workers (given to onnxruntime as that count, so it never pins threads itself).",
    )
    providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        min_length=1,
        description="onnxruntime execution providers in order of preference (Jetson: CUDAExecutionProvider or "
        "TensorrtExecutionProvider first, CPUExecutionProvider last).",
    )
    batch: int = Field(
        1,
        ge=1,
        le=256,
        description="Frames per inference call for a replay or file source at fps 0 (others: one at a time).",
    )
    workers: int = Field(
        0,
        ge=0,
        le=64,
        description=(
            "Inference calls at once for a replay or file source at fps 0, each on model.threads threads, events "
            "still in frame order (others: one). 0 = auto: one per core with the onnx backend on the CPU (one "
            "thread each), else one."
        ),
    )
    spinning: Literal["auto", "on", "off"] = Field(
        "auto",
        description=(
            "Whether onnxruntime's threads spin between jobs. 'auto': on for a replay or file source at "
            "fps 0 (throughput), off for cameras and paced sources, where spinning burns a core between "
            "frames for about a millisecond of latency."
        ),
    )
    graph_optimization: Literal["all", "extended", "basic", "disabled"] = Field(
        "all", description="onnxruntime graph optimisation level."
    )
    cpu_arena: bool = Field(True, description="onnxruntime's CPU memory arena (off: memory back to the system sooner).")
    small_input: Literal["fit", "checkpoint"] = Field(
        "fit",
        description=(
            "Images smaller than the model's crop (e.g. CIFAR's 32x32): 'fit' scales them whole onto the crop "
            "with bicubic interpolation; 'checkpoint' follows preprocessor_config.json exactly."
        ),
    )
    coarse: Literal["cifar10", "none"] = Field(
        "cifar10", description="Coarse label space for ImageNet models ('none' disables)."
    )
    coarse_priors: str = Field(
        "builtin",
        min_length=1,
        description="'builtin' (shipped estimate), 'none' (plain group sums) or a priors JSON file.",
    )


def check_endpoint(endpoint: str) -> str:
    """A ZeroMQ bind endpoint, checked as far as its text goes; ValueError says what is wrong.

    ZeroMQ only finds a malformed endpoint at bind, after the model has loaded, and reports it as a failure a
    restart might cure; the text alone shows that it never will.
    """
    transport, sep, address = endpoint.partition("://")
    if not sep or transport not in ("tcp", "ipc", "inproc"):
        raise ValueError("expected tcp://HOST:PORT, ipc://PATH or inproc://NAME")
    if not address:
        raise ValueError(f"nothing after {transport}://")
    if transport == "tcp":
        _check_tcp_address(address)
    elif transport == "ipc" and address.startswith("*"):
        # ZeroMQ binds a random path in a temporary folder for it, which only the log would reveal to subscribers,
        # and publish.ipc_mode could not be applied to it.
        raise ValueError("ipc://* (a random path ZeroMQ picks) cannot be subscribed to: give the socket's path")
    elif transport == "ipc" and len(address.encode()) > IPC_PATH_MAX:
        raise ValueError(f"the ipc path is longer than {IPC_PATH_MAX} bytes, the most a Unix socket address holds")
    return endpoint


def _check_tcp_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise ValueError("a tcp endpoint is tcp://HOST:PORT, HOST an address, an interface or *")
    if port != "*" and not (port.isascii() and port.isdigit() and int(port) <= 65535):
        raise ValueError(f"port {port!r} is not a number from 1 to 65535, or * for any free port")
    if not _bindable_host(host):
        hint = " (an IPv6 address goes in brackets: tcp://[::1]:5556)" if ":" in host else ""
        raise ValueError(f"host {host!r} is not an IP address, an interface name or *{hint}")


def _bindable_host(host: str) -> bool:
    if host == "*":
        return True
    if host.startswith("[") and host.endswith("]"):  # [::1], or [fe80::1%eth0] with a scope
        return _is_ip(host[1:-1].partition("%")[0], 6)
    if all(part.isdigit() for part in host.split(".")):  # digits and dots are an IPv4 address or nothing
        return _is_ip(host, 4)
    return _INTERFACE.fullmatch(host) is not None


def _is_ip(text: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False


def connect_endpoint(endpoint: str) -> str:
    """Where a subscriber on this machine reaches a PUB socket bound to ``endpoint``; ValueError when it cannot.

    ``tcp://*:5556`` binds every address but is no address to connect to: the loopback is one of them. A
    ZeroMQ bind also takes an interface name (``tcp://eth0:5556``), which a connect would look up as a host name.
    """
    check_endpoint(endpoint)
    transport, _, address = endpoint.partition("://")
    if transport == "inproc":
        raise ValueError("an inproc:// endpoint is reachable only from inside the daemon's process")
    if transport != "tcp":
        return endpoint
    host, _, port = address.rpartition(":")
    if port == "*":
        raise ValueError("port * is one the daemon picks at start (its log names it): give that port")
    if host in ("*", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "[::]":
        host = "[::1]"
    elif not host.startswith("[") and not _is_ip(host, 4) and host in {name for _, name in socket.if_nameindex()}:
        host = interface_ipv4(host)
    return f"tcp://{host}:{port}"


def interface_ipv4(name: str) -> str:
    """The IPv4 address of network interface ``name``, as ZeroMQ binds it; ValueError when it has none."""
    import fcntl
    import struct

    siocgifaddr = 0x8915  # Linux's ioctl for an interface's address; ZeroMQ binds an interface's IPv4 one
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            answer = fcntl.ioctl(sock.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
        except OSError as exc:
            raise ValueError(f"interface {name} has no IPv4 address ({exc.strerror}): give the address") from None
    return socket.inet_ntoa(answer[20:24])


def endpoint_ipv6(endpoint: str) -> bool:
    """Whether a tcp endpoint names an IPv6 address, which a ZeroMQ socket reaches only with its IPV6 option on."""
    return endpoint.startswith("tcp://[")


class PublishConfig(Section):
    endpoint: str = Field(
        "tcp://127.0.0.1:5556",
        description="ZeroMQ endpoint the PUB socket binds: tcp://HOST:PORT (HOST an address, [IPv6], an interface "
        "or *; PORT 1-65535 or *), ipc://PATH or inproc://NAME.",
    )
    wait_subscribers: int = Field(
        0,
        ge=0,
        description="Before the first frame, wait for this many subscribers to this source's label or drift "
        "events (an `eyed health` probe, or a reader of another source's topics, is not one; each subscription "
        "counts, so a reader of both label and drift topics counts twice).",
    )
    wait_timeout_s: float = Field(30.0, gt=0, description="Give up waiting for subscribers after this long.")
    heartbeat_s: float = Field(5.0, gt=0, description="Seconds between health heartbeats.")
    hwm: int = Field(10000, ge=1, description="Messages queued per subscriber before dropping.")
    linger_ms: int = Field(
        1000,
        ge=0,
        le=10_000,
        description="How long close() may flush queued messages, after the pipeline stopped: "
        f"daemon.shutdown_timeout_s plus this must stay {STOP_MARGIN_S:g} s below the unit's TimeoutStopSec "
        f"({UNIT_STOP_TIMEOUT_S:g} s).",
    )
    ipc_mode: str = Field(
        "0666",
        pattern=r"^0?[0-7]{3}$",
        description="Permissions of an ipc:// socket file (octal): who may connect. By default anyone on the "
        "machine, as with a tcp endpoint on the loopback; 0660 keeps it to the daemon's user and group, and CURVE "
        "admits only listed keys.",
    )
    curve_secret_key: Path | None = Field(
        None, description="CURVE: the daemon's NAME.key_secret from `eyed keys`; set, only listed clients connect."
    )
    curve_clients: Path | None = Field(
        None, description="CURVE: folder of the public keys (*.key) of the subscribers allowed to connect."
    )

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, value: str) -> str:
        return check_endpoint(value)

    @model_validator(mode="after")
    def _check_curve(self) -> PublishConfig:
        if (self.curve_secret_key is None) != (self.curve_clients is None):
            raise ValueError("publish.curve_secret_key and publish.curve_clients must be set together")
        return self


# The fewest frames a drift window holds: fewer say little about a distribution over 20 classes.
MIN_WINDOW = 20
# The most frames a drift window holds (drift.window, or a window of drift.window_s seconds on a fast source):
# it bounds the window's buffer, a learned reference and a calibration's cost on the inference thread.
MAX_WINDOW = 20_000
# Frames per drift window when neither drift.window nor drift.window_s is set.
DEFAULT_WINDOW = 250
# The most frames a reference learned without a profile is made from: the monitor holds every one of them until
# learning ends (80 bytes a frame: 8 MB, up to twice that while its buffer grows), and calibrates on the
# inference thread then.
MAX_LEARNED = 5 * MAX_WINDOW


class DriftConfig(Section):
    enabled: bool | None = Field(
        None,
        description="Monitor drift; unset = on when drift.reference is set. Without a reference the first "
        "drift.learn_windows windows become the reference.",
    )
    reference: Path | None = Field(None, description="Reference profile written by 'eyed profile --output'.")
    # Unset rather than 250 by default, so that "both set" is an error a dump of the settings never makes.
    window: int | None = Field(
        None,
        ge=MIN_WINDOW,
        le=MAX_WINDOW,
        description=f"Frames per drift window ({DEFAULT_WINDOW} when neither this nor drift.window_s is set).",
    )
    window_s: float | None = Field(
        None,
        gt=0,
        le=3600,
        description="Seconds per drift window, instead of drift.window frames: a window closes with its first frame "
        f"this long after its start, once it holds at least {MIN_WINDOW} frames (at most {MAX_WINDOW}).",
    )
    consecutive: int = Field(2, ge=1, description="Windows over a drift threshold in a row before status 'drift'.")
    learn_windows: int = Field(
        4,
        ge=1,
        le=MAX_LEARNED // MIN_WINDOW,
        description=f"Without a reference: windows that become the reference (learning ends sooner once it holds "
        f"{MAX_LEARNED} frames).",
    )
    top_classes: int = Field(
        20,
        ge=1,
        le=200,
        description="Fine classes compared one by one (the rest: 'other') in a profile 'eyed profile' writes or a "
        "reference learned without one; a drift.reference file keeps the classes it was made with.",
    )
    psi_warn: float = Field(0.1, gt=0, description="PSI warn threshold (raised to the reference's own noise).")
    psi_drift: float = Field(0.25, gt=0, description="PSI drift threshold (raised to the reference's own noise).")
    js_warn: float = Field(0.1, gt=0, le=1, description="Jensen-Shannon distance warn threshold (raised likewise).")
    js_drift: float = Field(0.2, gt=0, le=1, description="Jensen-Shannon distance drift threshold (raised likewise).")
    ks_warn: float = Field(0.15, gt=0, le=1, description="Kolmogorov-Smirnov statistic warn threshold.")
    ks_drift: float = Field(0.25, gt=0, le=1, description="Kolmogorov-Smirnov statistic drift threshold.")
    sigmas: float = Field(
        3.0,
        ge=0,
        description="Warn thresholds are raised to at least mean + sigmas x std of the metric on reference windows, "
        "drift thresholds by the same factor (for JS and KS, which cannot exceed 1, at most halfway from warn to 1).",
    )

    @model_validator(mode="after")
    def _check_order(self) -> DriftConfig:
        for name in ("psi", "js", "ks"):
            if getattr(self, f"{name}_warn") > getattr(self, f"{name}_drift"):
                raise ValueError(f"drift.{name}_warn is larger than drift.{name}_drift")
        if self.window is not None and self.window_s is not None:
            raise ValueError(
                "set drift.window (frames) or drift.window_s (seconds), not both (an empty value clears the one "
                "a file sets: --set drift.window=)"
            )
        learned = self.learn_windows * self.window_frames
        if self.active() and self.reference is None and self.window_s is None and learned > MAX_LEARNED:
            raise ValueError(
                f"drift.learn_windows x drift.window is {learned} frames, more than the {MAX_LEARNED} a reference "
                "learned at start is made from: lower one of them, or make a profile with 'eyed profile' and set "
                "drift.reference"
            )
        return self

    @property
    def window_frames(self) -> int:
        """Frames per window; with ``window_s``, the size a window's buffer starts at."""
        return self.window if self.window is not None else DEFAULT_WINDOW

    def window_text(self) -> str:
        """The window size for people: ``250 frames`` or ``10 s``."""
        return f"{self.window_s:g} s" if self.window_s is not None else f"{self.window_frames} frames"

    def active(self) -> bool:
        return self.enabled if self.enabled is not None else self.reference is not None


class LogConfig(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")


class DaemonConfig(Section):
    shutdown_timeout_s: float = Field(
        5.0,
        gt=0,
        lt=UNIT_STOP_TIMEOUT_S,
        description=f"Bound on a clean shutdown; this plus publish.linger_ms must stay {STOP_MARGIN_S:g} s below "
        f"the unit's TimeoutStopSec ({UNIT_STOP_TIMEOUT_S:g} s), or systemd kills eyed before it ends.",
    )


class Settings(BaseSettings):
    """The whole configuration. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )
    # Set by load_settings before construction; pydantic-settings reads it in settings_customise_sources.
    _toml_file: ClassVar[Path | None] = None

    source: SourceConfig = Field(default_factory=SourceConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    daemon: DaemonConfig = Field(default_factory=DaemonConfig)

    def runtime_model(self) -> ModelConfig:
        """The model section as this source runs it: ``spinning="auto"`` and ``workers=0`` decided, and
        ``batch`` and ``workers`` kept only where frames are always waiting (a replay or file at fps 0).

        A paced or live source goes a frame at a time on every core: filling a batch would hold each frame
        until the last one of its batch arrived, and a second frame in flight would only make the first
        slower. At fps 0 the onnx backend runs one frame per core, each on one thread, unless
        ``model.threads`` says otherwise: ``eyed bench`` measured two frames at once, one thread each,
        faster than one frame on two threads (README, Performance).
        """
        m = self.model
        throughput = self.source.kind in ("replay", "file") and self.source.fps == 0
        cores = available_cores()
        update: dict[str, object] = {}
        if m.spinning == "auto":
            update["spinning"] = "on" if throughput else "off"
        workers = m.workers
        if not throughput:
            update["batch"], workers = 1, 1
        elif workers == 0:
            # Only measured on CPUs: a GPU provider (a Jetson) keeps one call at a time unless told otherwise.
            cpu_only = m.backend == "onnx" and m.providers == ["CPUExecutionProvider"]
            workers = max(1, cores // (m.threads or 1)) if cpu_only else 1
        update["workers"] = workers
        # torch keeps its own default (its physical cores) unless workers share the cores or fewer are ours.
        if m.threads == 0 and (m.backend == "onnx" or workers > 1 or cores < (os.cpu_count() or cores)):
            update["threads"] = resolved_threads(cores, workers)
        return m.model_copy(update=update)

    def full_speed_model(self) -> ModelConfig:
        """The model section as the daemon runs it on this source at fps 0, every frame as soon as it can: how
        ``eyed bench`` and the offline commands (``eyed.offline``) run it, whatever pace the configuration sets."""
        return self.model_copy(update={"source": self.source.model_copy(update={"fps": 0.0})}).runtime_model()

    @model_validator(mode="after")
    def _check_cross_fields(self) -> Settings:
        if self.model.onnx is not None and self.model.backend != "onnx":
            raise ValueError("model.onnx is set but model.backend is not 'onnx'")
        stop_s = self.daemon.shutdown_timeout_s + self.publish.linger_ms / 1000
        if stop_s + STOP_MARGIN_S >= UNIT_STOP_TIMEOUT_S:
            raise ValueError(
                f"daemon.shutdown_timeout_s ({self.daemon.shutdown_timeout_s:g} s) plus publish.linger_ms "
                f"({self.publish.linger_ms} ms) is {stop_s:g} s: with {STOP_MARGIN_S:g} s for the source and "
                f"the model to close, it must stay below the unit's TimeoutStopSec ({UNIT_STOP_TIMEOUT_S:g} s), "
                "or systemd kills eyed before its shutdown ends"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls._toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls._toml_file))
        return tuple(sources)


def resolved_threads(cores: int, workers: int) -> int:
    """Threads per inference call for ``model.threads = 0``: the cores, shared among the workers.

    Never left at 0 for onnxruntime: with 0 it counts the machine's cores (not an affinity mask or a CPU
    quota) and pins its threads itself, which the unit's SystemCallFilter=~@resources refuses with an ERROR in
    the journal at every start; with a count set it pins nothing. Threads for every worker would take turns at
    the same cores, hence the share.
    """
    return max(1, cores // max(1, workers))


def available_cores() -> int:
    """The cores this process may use: those it may run on (a systemd CPUAffinity= or taskset counts), and no
    more than a cgroup v2 CPU quota allows (systemd's CPUQuota=, docker --cpus), rounded up."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(cores, math.ceil(quota))) if quota is not None else cores


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs' worth of time this process's cgroup (v2) may use, from its ``cpu.max`` and its parents'; None
    without a limit or outside cgroup v2."""
    try:
        line = next(entry for entry in membership.read_text().splitlines() if entry.startswith("0::"))
    except (OSError, StopIteration):
        return None
    folder = root / line[3:].strip().lstrip("/")
    limits = []
    while True:
        try:
            quota, period = (folder / "cpu.max").read_text().split()
            if quota != "max":
                limits.append(int(quota) / int(period))
        except (OSError, ValueError):
            pass
        if folder == root or root not in folder.parents:
            break
        folder = folder.parent
    return min(limits) if limits else None


class ConfigError(Exception):
    """The configuration is invalid; the message names the field."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.field=value`` into its key path and value: the raw text, or for a JSON array (a list
    option such as ``model.providers=["CUDAExecutionProvider"]``) the list, as the environment takes it."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected section.field=value")
    path = [part.strip() for part in key.split(".")]
    if value.lstrip().startswith("["):
        # Not JSON: left as text, for a path that starts with "[" or for the field's own check to name.
        with contextlib.suppress(json.JSONDecodeError):
            return path, json.loads(value)
    return path, value


def _nest(overrides: list[str]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for text in overrides:
        path, value = parse_override(text)
        node = nested
        for depth, part in enumerate(path[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):  # --set source=5 and then --set source.limit=1
                raise ConfigError(f"override {text!r}: {'.'.join(path[: depth + 1])} is a section, not a value")
        if isinstance(node.get(path[-1]), dict):  # --set source.limit=1 and then --set source=5
            raise ConfigError(f"override {text!r}: {'.'.join(path)} is a section, not a value")
        node[path[-1]] = value
    return nested


def load_settings(config: Path | None = None, overrides: list[str] | None = None) -> Settings:
    """Build the settings from defaults, the TOML file, the environment and overrides; raise ConfigError."""
    from pydantic import ValidationError

    if config is not None and not config.is_file():
        raise ConfigError(f"--config {config}: no such file")
    check_environment()
    try:
        Settings._toml_file = config
        return Settings(**_nest(overrides or []))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    except SettingsError as exc:  # EYED_SOURCE='not json': a whole section from the environment must be JSON
        raise ConfigError(f"environment: {exc} (an EYED_<SECTION> variable holds a JSON object)") from None
    except OSError as exc:  # e.g. a file only root may read, under the unit's DynamicUser
        raise ConfigError(f"--config {config}: cannot read it: {exc.strerror or exc}") from None
    except ValueError as exc:  # a TOML syntax error surfaces as ValueError (tomllib.TOMLDecodeError)
        raise ConfigError(f"{config}: {exc}") from None
    finally:
        Settings._toml_file = None


def check_environment() -> None:
    """An EYED_<SECTION>__<FIELD> variable whose section does not exist is an error, as it is in TOML.

    pydantic-settings only matches variables to known sections and drops the rest, so a misspelt section
    would silently leave its setting at the default. Variables without the delimiter (EYED_SHARED, which the
    tests use) are not settings and are left alone.
    """
    for name in os.environ:
        if not name.upper().startswith(ENV_PREFIX):
            continue
        section, sep, _ = name[len(ENV_PREFIX) :].partition("__")
        if sep and section.lower() not in Settings.model_fields:
            known = ", ".join(Settings.model_fields)
            raise ConfigError(f"environment variable {name}: unknown section {section.lower()!r} (known: {known})")


def format_validation_error(exc: Any) -> str:
    """One line per problem, each naming the field as ``section.field``."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"]) or "(settings)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown option"
        # The input may be the whole source section, url and its password with it: messages go to the journal.
        got = _redacted(err.get("input"))
        lines.append(f"{loc}: {msg} (got {got!r})" if err["type"] != "missing" else f"{loc}: {msg}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def dump_settings(settings: Settings) -> str:
    """The effective configuration as TOML text (what ``eyed check-config`` prints), with the password and
    secret query values of URLs hidden (:func:`redact_url`)."""
    data = _redacted(settings.model_dump(mode="json"))
    out: list[str] = []
    for section, values in data.items():
        out.append(f"[{section}]")
        for key, value in values.items():
            if value is None:
                out.append(f"# {key} = (unset)")
            else:
                out.append(f"{key} = {_toml_value(value)}")
        out.append("")
    return "\n".join(out)


def _toml_value(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    # JSON string escapes are valid TOML basic-string escapes; ensure_ascii=False keeps non-ASCII characters
    # as they are (JSON would write surrogate pairs, which TOML rejects).
    return json.dumps(str(value), ensure_ascii=False)
