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

# Debian packages the tests use (checked, installed only when missing).
DEB_PACKAGES=(python3-venv mosquitto mosquitto-clients openssl socat)
missing=()
for pkg in "${DEB_PACKAGES[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "run_all: installing ${missing[*]}"
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

cargo build --release -p runnel
export RUNNEL_BIN="$PWD/target/release/runnel"

cargo test --workspace

# The Bytewax adapter's MQTT connectors and decoders, on their own broker.
"$RUNNEL_BYTEWAX_PYTHON" tests/oracle/mqtt_adapter_check.py
echo "run_all: every test passed"
