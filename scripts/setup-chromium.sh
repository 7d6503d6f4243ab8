#!/bin/sh
# Makes sure a headless Chromium is installed for the dashboard's browser test
# (test/http/dashboard.browser.test.ts drives it with puppeteer-core). Idempotent
# and non-interactive; the browser comes from Debian/Ubuntu (apt), never from a
# download puppeteer would make. Prints the browser's path on its last line.
#   exit 0  a browser is present (or was just installed)
#   exit 1  none is present and it cannot be installed from here
set -u

find_browser() {
  for b in "${STEPBROKER_CHROMIUM:-}" chromium chromium-browser google-chrome-stable google-chrome; do
    [ -n "$b" ] || continue
    p=$(command -v "$b" 2>/dev/null) || continue
    # Ubuntu's chromium-browser can be a stub that asks for snap: require a real --version.
    if "$p" --version >/dev/null 2>&1; then
      echo "$p"
      return 0
    fi
  done
  return 1
}

if p=$(find_browser); then
  echo "setup-chromium: $("$p" --version 2>/dev/null) is present"
  echo "$p"
  exit 0
fi

if [ "$(id -u 2>/dev/null)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup-chromium: installing chromium with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  if apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null; then
    if p=$(find_browser); then
      echo "setup-chromium: $("$p" --version 2>/dev/null) is installed"
      echo "$p"
      exit 0
    fi
  fi
  echo "setup-chromium: apt-get could not install a working chromium" >&2
  exit 1
fi

{
  echo "setup-chromium: no Chromium is installed, and this script can only install"
  echo "it as root on Debian/Ubuntu. Install it with:"
  echo "    sudo apt-get install -y chromium"
  echo "(or point STEPBROKER_CHROMIUM at a Chromium or Chrome executable)."
} >&2
exit 1
