#!/bin/sh
# Makes sure `ip netns` (iproute2) is available for the CURVE test between two
# network namespaces (test/cli-curve.test.ts). Idempotent and non-interactive.
#   exit 0  ip netns works (or iproute2 was just installed)
#   exit 1  it does not, and cannot be installed from here (not root, no apt-get)
set -u

check() {
  command -v ip >/dev/null 2>&1 && ip netns list >/dev/null 2>&1
}

if check; then
  echo "setup-netns: ip netns is available"
  exit 0
fi

if [ "$(id -u 2>/dev/null)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup-netns: installing iproute2 with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  if apt-get update -qq && apt-get install -y -qq iproute2 >/dev/null && check; then
    echo "setup-netns: iproute2 is installed"
    exit 0
  fi
  echo "setup-netns: apt-get could not install a working iproute2" >&2
  exit 1
fi
echo "setup-netns: ip netns is unavailable; as root, run: apt-get install -y iproute2" >&2
exit 1
