#!/usr/bin/env bash
# Install eyed as a hardened systemd service (Raspberry Pi OS, Debian, Ubuntu, Jetson's L4T). Run as root from
# a checkout. The service runs as a dynamic user (no account to create) in the video group.
#
#   sudo scripts/install.sh              # onnx-only install (no torch): bring an ONNX file from `eyed export`
#   sudo EYED_EXTRAS=onnx,replay scripts/install.sh
#
# Paths can be moved for a dry run: PREFIX (/opt/eyed), ETC (/etc/eyed), UNIT_DIR (/etc/systemd/system).
set -euo pipefail

SRC=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${PREFIX:-/opt/eyed}
ETC=${ETC:-/etc/eyed}
UNIT_DIR=${UNIT_DIR:-/etc/systemd/system}
EXTRAS=${EYED_EXTRAS:-onnx}
PYTHON=${PYTHON:-python3}

echo "installing eyed[$EXTRAS] into $PREFIX/venv"
[ -x "$PREFIX/venv/bin/python" ] || "$PYTHON" -m venv "$PREFIX/venv"
"$PREFIX/venv/bin/python" -m pip install --quiet --upgrade pip
"$PREFIX/venv/bin/python" -m pip install --quiet "$SRC[$EXTRAS]"

install -d -m 0755 "$ETC"
if [ ! -f "$ETC/eyed.toml" ]; then
  install -m 0644 "$SRC/configs/camera.toml" "$ETC/eyed.toml"
  echo "wrote $ETC/eyed.toml: set source.url and model.onnx, then: systemctl restart eyed"
fi
install -d -m 0755 "$UNIT_DIR"
sed "s#/opt/eyed/venv/bin/eyed#$PREFIX/venv/bin/eyed#; s#/etc/eyed/eyed.toml#$ETC/eyed.toml#" \
  "$SRC/systemd/eyed.service" > "$UNIT_DIR/eyed.service"
chmod 0644 "$UNIT_DIR/eyed.service"

# A bad config exits 78 and systemd will not restart it; say so now rather than in the journal.
"$PREFIX/venv/bin/eyed" check-config --config "$ETC/eyed.toml" > /dev/null

if [ "$UNIT_DIR" = /etc/systemd/system ] && command -v systemctl > /dev/null && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable eyed.service
  echo "enabled eyed.service: systemctl start eyed; journalctl -u eyed -f; eyed health --endpoint ..."
else
  echo "unit written to $UNIT_DIR/eyed.service (systemd not running here: not enabled)"
fi
