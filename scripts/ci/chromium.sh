#!/usr/bin/env bash
# Debian's Chromium for the browser tests of `clt serve` (tests/test_serve.py drives it with
# Playwright through executable_path=/usr/bin/chromium; no `playwright install`, no download
# of a browser build). Idempotent: does nothing when /usr/bin/chromium is already there.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get -o DPkg::Lock::Timeout=300 update -qq
$SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -qq chromium
/usr/bin/chromium --version
