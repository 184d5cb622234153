#!/usr/bin/env bash
# The one test command: installs what a fresh Debian bookworm machine is
# missing, then runs every test (unit, integration, Bytewax oracle).
#
#   ./tests/run_all.sh
#
# Needs: rustup's cargo, and a Python 3.9+ with a shared libpython on PATH
# as python3 (Raspberry Pi OS and Debian's python3.11 qualify).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# Debian packages the tests use (checked, installed only when missing), and
# those cross/build needs for the aarch64 binary and the .deb (cross/packages;
# the arm64 ones need dpkg's arm64 architecture): one apt-get update for all.
DEB_PACKAGES=(python3-venv mosquitto mosquitto-clients openssl socat systemd util-linux procps)
mapfile -t CROSS_PACKAGES < <(grep -v '^#' cross/packages | sed '/^\s*$/d')
missing=()
for pkg in "${DEB_PACKAGES[@]}" "${CROSS_PACKAGES[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "run_all: installing ${missing[*]}"
    if ! dpkg --print-foreign-architectures | grep -qx arm64; then
        $SUDO dpkg --add-architecture arm64
    fi
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
fi

# Bytewax 0.21.1 (the oracle) and paho-mqtt (its MQTT connectors) live in
# their own virtualenv; one that lacks either is rebuilt.
VENV=.venv-test
if ! "$VENV/bin/python" -c 'import bytewax, paho.mqtt.client, importlib.metadata as m; assert m.version("bytewax") == "0.21.1"; assert m.version("paho-mqtt") == "2.1.0"' 2>/dev/null; then
    echo "run_all: creating $VENV with bytewax==0.21.1 paho-mqtt==2.1.0"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check bytewax==0.21.1 paho-mqtt==2.1.0
fi
export RUNNEL_BYTEWAX_PYTHON="$PWD/$VENV/bin/python"

# Flows are code: runnel refuses flow files (and folders) that group or
# others may write, so a checkout made with umask 002 is tightened first.
chmod -R go-w flows tests/flows

cargo build --release -p runnel
export RUNNEL_BIN="$PWD/target/release/runnel"

# The Raspberry Pi build: the aarch64 binary and the .deb, which the package
# tests (tests/tests/pi.rs) check under qemu; here they may not skip.
cross/build
mapfile -t CROSS_OUT < <(cross/build --print-paths)
export RUNNEL_AARCH64_BIN="${CROSS_OUT[0]}" RUNNEL_DEB="${CROSS_OUT[1]}" RUNNEL_REQUIRE_CROSS=1

cargo test --workspace

# The Bytewax adapter's MQTT connectors and decoders, on their own broker.
"$RUNNEL_BYTEWAX_PYTHON" tests/oracle/mqtt_adapter_check.py
echo "run_all: every test passed"
