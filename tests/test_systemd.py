"""The unit file: required directives, systemd-analyze verify, and a security exposure of 2.0 or lower."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import platform
import re
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from eyed.cli import EXIT_CONFIG
from eyed.config import DaemonConfig
from tests.conftest import ROOT
from tests.daemon_helpers import collect, daemon_env, finish

UNIT = ROOT / "systemd" / "eyed.service"
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


def directives() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_unit_has_what_a_notify_service_needs() -> None:
    d = directives()
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert d["Restart"] == ["on-failure"]
    assert d["RestartPreventExitStatus"] == [str(EXIT_CONFIG)]
    assert "/etc/eyed/eyed.toml" in d["ExecStart"][0]
    watchdog = int(d["WatchdogSec"][0])
    assert watchdog >= 10
    # systemd must give eyed's own bounded shutdown time to finish before it kills it.
    assert int(d["TimeoutStopSec"][0]) > DaemonConfig().shutdown_timeout_s
    for key in ("DynamicUser", "ProtectHome", "PrivateTmp", "NoNewPrivileges"):
        assert d[key] == ["yes"], key
    assert d["ProtectSystem"] == ["strict"]
    assert d["CapabilityBoundingSet"] == [""]
    assert d["SupplementaryGroups"] == ["video"]
    assert d["DevicePolicy"] == ["closed"] and d["DeviceAllow"] == ["char-video4linux rw"]
    assert "@system-service" in d["SystemCallFilter"]
    assert d["RuntimeDirectory"] == ["eyed"] and "MemoryMax" in d


def sections() -> dict[str, dict[str, list[str]]]:
    """The unit's directives by section: a [Unit] key in [Service] is ignored by systemd, with a warning."""
    out: dict[str, dict[str, list[str]]] = {}
    current = out.setdefault("", {})
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            current = out.setdefault(line[1:-1], {})
        elif line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            current.setdefault(key, []).append(value)
    return out


def test_a_daemon_failing_at_start_is_not_restarted_for_ever() -> None:
    """Exit 69 at once (a dataset path typo): systemd's default start limit, 5 starts in 10 s, is never reached
    with RestartSec=5, so the unit would restart every 5 s for good. The unit's own limit is reached within
    its interval, and then the unit shows as failed."""
    unit, service = sections()["Unit"], sections()["Service"]
    interval = int(unit["StartLimitIntervalSec"][0])
    burst = int(unit["StartLimitBurst"][0])
    restart_s = float(service["RestartSec"][0])
    assert (burst, interval) == (10, 300)
    assert burst * restart_s < interval  # a start that fails at once hits the limit
    assert "StartLimitIntervalSec" not in service and "StartLimitBurst" not in service


def test_tasks_max_leaves_room_for_a_many_core_box() -> None:
    """onnxruntime's pools (per worker, per core), OpenCV's and FFmpeg's threads and captures abandoned by a
    stuck camera all count against TasksMax: 64 was too few on 16 cores."""
    assert int(directives()["TasksMax"][0]) >= 256


def unit_environment() -> dict[str, str]:
    """What the unit's Environment= lines set."""
    env: dict[str, str] = {}
    for line in directives().get("Environment", []):
        for item in line.split():
            key, _, value = item.partition("=")
            env[key] = value
    return env


def test_model_cache_dir_in_the_config_file_wins_under_the_unit(tmp_path: Path) -> None:
    """Under the unit (its Environment=, and $CACHE_DIRECTORY as systemd sets it from CacheDirectory=), the
    cache is /var/cache/eyed unless eyed.toml says otherwise; an EYED_MODEL__CACHE_DIR in the unit used to beat
    the file without a word."""
    service = sections()["Service"]
    assert service["CacheDirectory"] == ["eyed"]
    assert not [k for k in unit_environment() if k.startswith("EYED_")]
    env = daemon_env({}, **unit_environment(), CACHE_DIRECTORY="/var/cache/eyed")

    def cache_dir(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "eyed", "check-config", *args], env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        line = next(x for x in result.stdout.splitlines() if x.startswith("cache_dir = "))
        return line.partition(" = ")[2].strip('"')

    assert cache_dir() == "/var/cache/eyed"
    config = tmp_path / "eyed.toml"
    config.write_text(f'[model]\ncache_dir = "{tmp_path / "models"}"\n')
    assert cache_dir("--config", str(config)) == str(tmp_path / "models")


def unit_with_real_binary(tmp_path: Path) -> Path:
    """systemd-analyze verify checks that ExecStart exists: point it at this checkout's eyed."""
    eyed = Path(sys.executable).with_name("eyed")
    unit = tmp_path / "eyed.service"
    unit.write_text(UNIT.read_text().replace("/opt/eyed/venv/bin/eyed", str(eyed)))
    return unit


@needs_analyze
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit_with_real_binary(tmp_path))], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    # verify exits 0 on unknown keys too; any line it prints about the unit is a defect.
    assert "eyed.service" not in result.stdout + result.stderr, result.stdout + result.stderr


@needs_analyze
def test_security_exposure_is_at_most_2(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(unit_with_real_binary(tmp_path))],
        capture_output=True,
        text=True,
    )
    match = re.search(r"Overall exposure level for eyed\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0


def errno_under(restriction: Callable[[], None], module: str, call: str) -> str:
    """What ``call`` (a statement using ``module``) gives in a Python process under ``restriction`` (a
    preexec_fn): the errno it fails with, or "done"."""
    probe = f"import {module}\ntry:\n    {call}\nexcept OSError as e:\n    print(e.errno)\nelse:\n    print('done')\n"
    out = subprocess.run([sys.executable, "-c", probe], preexec_fn=restriction, capture_output=True, text=True)
    assert out.stdout.strip(), out.stderr
    return out.stdout.strip()


def assert_publishes_under(restriction: Callable[[], None], base: dict[str, object], endpoint: str) -> None:
    """The real daemon, under ``restriction`` (a preexec_fn, as the unit restricts it), replays the tiny dataset
    to the end and publishes every label."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "eyed", "run"],
        env=daemon_env(base),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=restriction,
    )
    events = collect(endpoint)
    code, err = finish(proc)
    assert code == 0, err
    assert sum(p["type"] == "label" for _, p in events) == 11


# RestrictAddressFamilies=, as systemd enforces it: a seccomp filter on socket(2) that fails any other family
# with EAFNOSUPPORT. systemd itself cannot run the unit here (no systemd as PID 1), so the tests apply the same
# filter to the real daemon.
SECCOMP_ARCH = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}  # AUDIT_ARCH_*, __NR_socket
needs_seccomp_arch = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() not in SECCOMP_ARCH, reason="seccomp filter for x86-64/aarch64 Linux"
)


def socket_families_only(families: list[str]) -> Callable[[], None]:
    """A preexec_fn: from exec on, socket(2) with a family not in ``families`` fails with EAFNOSUPPORT."""
    arch, nr_socket = SECCOMP_ARCH[platform.machine()]
    allowed = [int(getattr(socket, name)) for name in families]

    def ins(code: int, jt: int, jf: int, k: int) -> bytes:
        return struct.pack("HBBI", code, jt, jf, k)

    ld, jeq, ret = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
    allow = 5 + len(allowed) + 1  # index of the final "allow"
    prog = [
        ins(ld, 0, 0, 4),  # seccomp_data.arch
        ins(jeq, 0, allow - 2, arch),
        ins(ld, 0, 0, 0),  # seccomp_data.nr
        ins(jeq, 0, allow - 4, nr_socket),
        ins(ld, 0, 0, 16),  # seccomp_data.args[0]: the family
        *(ins(jeq, allow - (6 + i), 0, family) for i, family in enumerate(allowed)),
        ins(ret, 0, 0, 0x00050000 | errno.EAFNOSUPPORT),  # SECCOMP_RET_ERRNO
        ins(ret, 0, 0, 0x7FFF0000),  # SECCOMP_RET_ALLOW
    ]
    code = b"".join(prog)

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    def apply() -> None:
        buf = ctypes.create_string_buffer(code)
        fprog = SockFprog(len(prog), ctypes.cast(buf, ctypes.c_void_p))
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS, as NoNewPrivileges=yes
            raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
        if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
            raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")

    return apply


@needs_seccomp_arch
def test_the_address_family_filter_blocks_what_the_unit_leaves_out() -> None:
    """The filter the next test relies on works: without AF_NETLINK in the list, a netlink socket is refused."""
    families = [f for f in directives()["RestrictAddressFamilies"][0].split() if f != "AF_NETLINK"]
    probe = "socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)"
    assert errno_under(socket_families_only(families), "socket", probe) == str(errno.EAFNOSUPPORT)


@needs_seccomp_arch
def test_the_daemon_binds_tcp_under_the_units_address_families(base: dict[str, object], endpoint: str) -> None:
    """libzmq opens a netlink socket to bind tcp://127.0.0.1:PORT (the default endpoint) and aborts without
    one: under the unit's RestrictAddressFamilies the daemon must still publish."""
    (families,) = directives()["RestrictAddressFamilies"]
    assert_publishes_under(socket_families_only(families.split()), base, endpoint)


# SystemCallFilter=, as systemd enforces it (through libseccomp, which systemd itself links): an allow-list
# built from the unit's lines in order, every other system call failing with SystemCallErrorNumber=.
libseccomp_path = ctypes.util.find_library("seccomp")
needs_libseccomp = pytest.mark.skipif(
    libseccomp_path is None or shutil.which("systemd-analyze") is None,
    reason="libseccomp and systemd-analyze (to expand the unit's @groups)",
)


def syscall_group(token: str) -> set[str]:
    """System call names in ``token``: a name, or an @group expanded (nested groups too) as systemd does."""
    if not token.startswith("@"):
        return {token}
    listing = subprocess.run(
        ["systemd-analyze", "syscall-filter", token], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    names: set[str] = set()
    for line in listing[1:]:  # the first line is the group's own name
        entry = line.strip()
        if entry and not entry.startswith("#"):
            names |= syscall_group(entry)
    return names


def unit_syscall_filter() -> tuple[set[str], int]:
    """The system calls the unit allows, and the errno the others fail with."""
    lines = directives()["SystemCallFilter"]
    assert not lines[0].startswith("~"), "the unit's first SystemCallFilter= line should be an allow-list"
    allowed = syscall_group("@default")  # systemd adds it to every allow-list
    for line in lines:
        deny = line.startswith("~")
        names = set().union(*(syscall_group(t) for t in line.removeprefix("~").split()))
        allowed = allowed - names if deny else allowed | names
    (errno_name,) = directives()["SystemCallErrorNumber"]
    return allowed, getattr(errno, errno_name)


def syscalls_only(allowed: set[str], error: int) -> Callable[[], None]:
    """A preexec_fn: from exec on, any system call not in ``allowed`` fails with ``error``."""
    lib = ctypes.CDLL(libseccomp_path, use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(0x00050000 | error)  # SCMP_ACT_ERRNO(error)
    assert ctx
    for name in sorted(allowed):
        number = lib.seccomp_syscall_resolve_name(name.encode())
        if number >= 0:  # negative: not a system call on this architecture
            assert lib.seccomp_rule_add(ctx, 0x7FFF0000, number, 0) == 0, name  # SCMP_ACT_ALLOW

    def apply() -> None:
        # Built above, loaded only in the child: after fork, the less it does the better.
        if lib.seccomp_load(ctx) != 0:
            raise OSError(ctypes.get_errno(), "seccomp_load")

    return apply


@needs_libseccomp
def test_the_system_call_filter_refuses_what_the_unit_leaves_out() -> None:
    """The filter the next test relies on works: the unit denies @resources, so setting the CPU affinity fails."""
    allowed, error = unit_syscall_filter()
    assert "sched_setaffinity" not in allowed
    probe = "os.sched_setaffinity(0, os.sched_getaffinity(0))"
    assert errno_under(syscalls_only(allowed, error), "os", probe) == str(error)


@needs_libseccomp
def test_the_daemon_runs_under_the_units_system_call_filter(base: dict[str, object], endpoint: str) -> None:
    """libzmq sets each of its threads' scheduling policy (sched_setscheduler, in @resources) and aborts if it
    cannot: under the unit's filter without it, the daemon died at every start (SIGABRT)."""
    assert_publishes_under(syscalls_only(*unit_syscall_filter()), base, endpoint)
