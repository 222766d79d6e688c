#!/usr/bin/env bash
# System packages the receiver tests need: a PostgreSQL server (started by the test fixtures) and
# Debian's headless Chromium with its WebDriver (gallery browser test), and Redis (scale-out tests).
# Idempotent and quiet.
set -euo pipefail
packages=(postgresql chromium chromium-driver redis-server)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
