#!/usr/bin/env bash
# Make sure headless Chromium and its WebDriver are installed for the console's browser test
# (tests/integration/test_console_browser.py): Debian's `chromium` and `chromium-driver` packages.
#
# Missing and running as root with apt-get (CI, a fresh machine): installs them. Missing otherwise: under CI=true it
# fails; on a developer's machine it says how to install them and the browser test is skipped.
set -euo pipefail

log() { echo "ensure-browser: $*"; }

have() { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }

if have; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing chromium and chromium-driver (Debian packages)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
if have; then
    log "chromium $(chromium --version 2>/dev/null | awk '{print $2}') and chromedriver installed"
    exit 0
fi
if [ "${CI:-}" = true ]; then
    log "chromium and chromedriver are missing and could not be installed; CI needs them." >&2
    exit 1
fi
log "no chromium/chromedriver here: the console's browser test will be skipped (CI runs it)." >&2
log "install them with: sudo apt-get install chromium chromium-driver" >&2
