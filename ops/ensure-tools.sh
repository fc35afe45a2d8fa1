#!/usr/bin/env bash
# Make sure `promtool` (Debian's `prometheus` package) is installed: the tests check the alert rules with it
# (`promtool check rules`, `promtool test rules`; tests/integration/test_ops_files.py). `make test` calls this.
#
# Installed with apt-get when it is missing and this runs as root on a Debian-like machine (CI does). Otherwise, on a
# developer's machine, it says how to install it and the promtool tests skip; under CI=true it exits 1 instead.
set -euo pipefail

log() { echo "ensure-tools: $*"; }

if command -v promtool >/dev/null 2>&1; then
    exit 0
fi
if [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null 2>&1; then
    log "promtool is missing: installing Debian's prometheus package"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    command -v promtool >/dev/null 2>&1 && exit 0
fi
if [[ "${CI:-}" == "true" ]]; then
    log "promtool is not installed and could not be installed; CI needs it (apt-get install prometheus)." >&2
    exit 1
fi
log "no promtool here, so the alert-rule checks will be skipped (install it: apt-get install prometheus)." >&2
