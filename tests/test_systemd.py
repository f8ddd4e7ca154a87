"""The unit file: required directives, systemd-analyze verify, and a security exposure of 2.0 or lower."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eyed.cli import EXIT_CONFIG
from eyed.config import DaemonConfig
from tests.conftest import ROOT

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
