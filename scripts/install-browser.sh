#!/bin/sh
# Installs what the headless-browser tests need (tests/test_console_browser.py,
# tests/test_desk_browser.py): a Chromium, and a CJK font (fonts-noto-cjk) so the review desk's
# Chinese renders as characters, not boxes.
# Idempotent: installs only what is missing. Uses apt-get when run as root on Debian/Ubuntu;
# otherwise says what to run and exits 0 (the browser tests then skip, or render boxes).
set -eu

have_chromium() {
    for name in chromium chromium-browser google-chrome; do
        if command -v "$name" >/dev/null 2>&1; then
            echo "install-browser: $(command -v "$name") present"
            return 0
        fi
    done
    return 1
}

have_cjk_font() {
    if command -v fc-list >/dev/null 2>&1 && [ -n "$(fc-list :lang=zh 2>/dev/null | head -n 1)" ]; then
        echo "install-browser: a CJK font is present"
        return 0
    fi
    if command -v dpkg-query >/dev/null 2>&1 &&
        dpkg-query -W -f='${Status}' fonts-noto-cjk 2>/dev/null | grep -q "ok installed"; then
        echo "install-browser: fonts-noto-cjk present"
        return 0
    fi
    return 1
}

missing=""
have_chromium || missing="chromium"
have_cjk_font || missing="$missing fonts-noto-cjk"
missing=$(echo "$missing" | sed 's/^ *//')

if [ -z "$missing" ]; then
    exit 0
fi

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "install-browser: installing $missing with apt-get"
    # $missing is a list of package names: split on purpose.
    # shellcheck disable=SC2086
    if apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing; then
        if command -v fc-cache >/dev/null 2>&1; then
            fc-cache -f >/dev/null 2>&1 || true
        fi
        exit 0
    fi
    echo "install-browser: apt-get could not install $missing" \
         "(the browser tests may skip or render boxes)" >&2
    exit 0
fi

echo "install-browser: missing $missing and cannot install it here;" \
     "run 'sudo apt-get install $missing' (the browser tests skip without chromium)" >&2
exit 0
