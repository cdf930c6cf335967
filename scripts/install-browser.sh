#!/bin/sh
# Installs a Chromium for the console's browser test (tests/test_console_browser.py).
# Idempotent: does nothing when a chromium binary is already there. Uses apt-get when run as
# root on Debian/Ubuntu; otherwise says what to run and exits 0 (the test then skips).
set -eu

for name in chromium chromium-browser google-chrome; do
    if command -v "$name" >/dev/null 2>&1; then
        echo "install-browser: $(command -v "$name") present"
        exit 0
    fi
done

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "install-browser: installing chromium with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
    exit 0
fi

echo "install-browser: no chromium found and cannot install it here;" \
     "run 'sudo apt-get install chromium' (the browser test will be skipped)" >&2
exit 0
