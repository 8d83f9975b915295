#!/usr/bin/env bash
# Used by `make test`. The HTML report's test (tests/test_report.py) renders it in headless Chromium: install Chromium
# from Debian when none is on PATH (as root, or through passwordless sudo); otherwise say so and go on
# (that test then fails, saying how to install it, unless FINPERCEP_SKIP_BROWSER=1).
if [ -z "${FINPERCEP_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; fi
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; }; then
    $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
      || echo "note: installing chromium failed; the browser test of the HTML report will fail"
  else
    echo "note: no chromium and no root/apt-get to install it; the browser test of the HTML report will fail" \
         "(install chromium, or set FINPERCEP_CHROMIUM=/path/to/chrome or FINPERCEP_SKIP_BROWSER=1)"
  fi
fi

