#!/bin/sh
# Makes sure Ruby and the libraries of the Ruby handler SDK (handlers-ruby/)
# are installed: ruby, ffi-rzmq (ZeroMQ) and msgpack. Idempotent and
# non-interactive; the Ruby packages come from Debian/Ubuntu (apt), not RubyGems.
#   exit 0  everything is present (or was just installed)
#   exit 1  something is missing and cannot be installed from here
set -u

check() {
  command -v ruby >/dev/null 2>&1 &&
    ruby -e 'require "ffi-rzmq"; require "msgpack"; require "minitest"' >/dev/null 2>&1
}

if check; then
  echo "setup-ruby: ruby $(ruby -e 'print RUBY_VERSION') with ffi-rzmq and msgpack is present"
  exit 0
fi

if [ "$(id -u 2>/dev/null)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup-ruby: installing ruby ruby-ffi-rzmq ruby-msgpack with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  if apt-get update -qq && apt-get install -y -qq ruby ruby-ffi-rzmq ruby-msgpack >/dev/null; then
    if check; then
      echo "setup-ruby: ruby $(ruby -e 'print RUBY_VERSION') with ffi-rzmq and msgpack is installed"
      exit 0
    fi
  fi
  echo "setup-ruby: apt-get could not install a working ruby + ffi-rzmq + msgpack" >&2
  exit 1
fi

{
  echo "setup-ruby: Ruby and its ZeroMQ/MessagePack libraries are missing, and this"
  echo "script can only install them as root on Debian/Ubuntu. Install them with:"
  echo "    sudo apt-get install -y ruby ruby-ffi-rzmq ruby-msgpack"
  echo "(elsewhere: Ruby >= 2.7, libzmq 4.x, and the gems ffi-rzmq and msgpack)."
} >&2
exit 1
