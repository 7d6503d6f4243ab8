#!/usr/bin/env bash
# Create (or refresh) the Python virtualenv used by the Python handler SDK and
# its tests: .stepbroker/venv at the repository root, with
# handlers-python[test] installed into it. Idempotent and non-interactive.
#
#   scripts/setup-python.sh            # create or update the venv
#   PYTHON=python3.12 scripts/setup-python.sh
#
# Then: .stepbroker/venv/bin/python -m pytest handlers-python/tests
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.stepbroker/venv"
python="${PYTHON:-python3}"

if ! command -v "$python" >/dev/null 2>&1; then
  echo "setup-python: '$python' was not found on PATH." >&2
  echo "setup-python: install Python 3.9 or newer (Debian/Ubuntu: apt-get install python3 python3-venv) or set PYTHON=/path/to/python3." >&2
  exit 1
fi

if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)'; then
  echo "setup-python: $("$python" --version 2>&1) is too old; stepbroker-handlers needs Python 3.9 or newer." >&2
  exit 1
fi

# The dependencies (pyzmq, msgpack, jsonschema, pytest) live in a venv shared
# by every clone of this user, in the cache directory, keyed by the Python and
# handlers-python/pyproject.toml: a fresh clone (CI runs one each time) then
# makes its own venv without pip, in a second, and sees them through a .pth
# file, instead of spending a minute creating a venv and installing them.
# STEPBROKER_CACHE_DIR= (empty) keeps everything inside the tree as before.
cache_root="${STEPBROKER_CACHE_DIR-${XDG_CACHE_HOME:-${HOME:-}/.cache}/stepbroker}"
[ "$cache_root" = "/.cache/stepbroker" ] && cache_root=""
deps_key="$({ "$python" -c 'import sys; print(sys.version, sys.executable)'; cat "$root/handlers-python/pyproject.toml"; } | sha256sum | cut -c1-16)"
deps_venv=""
[ -n "$cache_root" ] && deps_venv="$cache_root/python-deps-$deps_key"

deps_site() {
  "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'
}

make_deps_venv() {
  # Built aside and renamed into place, so a half-made one is never used and
  # two clones making it at once both end with one whole venv. (Called in an
  # `if`, where set -e is off: every step checks for itself.)
  mkdir -p "$cache_root" || return 1
  local tmp
  tmp="$(mktemp -d "$cache_root/.python-deps-XXXXXX")" || return 1
  if "$python" -m venv "$tmp/venv" &&
    "$tmp/venv/bin/python" -m pip install -q --disable-pip-version-check "setuptools>=70.1" "$root/handlers-python[test]" &&
    "$tmp/venv/bin/python" -m pip uninstall -q -y stepbroker-handlers; then
    mv -T "$tmp/venv" "$deps_venv" 2>/dev/null || true # another clone may have just made it
  else
    echo "setup-python: could not make the shared dependency venv in $cache_root; making a private one" >&2
  fi
  rm -rf "$tmp"
  [ -x "$deps_venv/bin/python" ]
}

# Usable: has pip (its own, or the shared venv's), and when it is built on a
# shared venv, on the one these dependencies need.
usable() {
  [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import pip' >/dev/null 2>&1 &&
    { [ ! -f "$venv/.stepbroker-deps.key" ] || [ "$(cat "$venv/.stepbroker-deps.key")" = "$deps_key" ]; }
}

if usable; then
  echo "setup-python: using existing venv $venv ($("$venv/bin/python" --version 2>&1))"
else
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  if [ -n "$deps_venv" ] && { [ -x "$deps_venv/bin/python" ] || make_deps_venv; }; then
    "$python" -m venv --without-pip "$venv"
    deps_site "$deps_venv" >"$(deps_site "$venv")/stepbroker-deps.pth"
    echo "$deps_key" >"$venv/.stepbroker-deps.key"
    echo "setup-python: created venv $venv ($("$venv/bin/python" --version 2>&1)) on the dependencies in $deps_venv"
  elif ! "$python" -m venv "$venv"; then
    echo "setup-python: '$python -m venv' failed; on Debian/Ubuntu install python3-venv." >&2
    exit 1
  else
    echo "setup-python: created venv $venv ($("$venv/bin/python" --version 2>&1))"
  fi
fi

# A non-editable install: the tests exercise the package as users get it.
# --force-reinstall of the package only, so edits are picked up. Skipped when
# the venv already holds this exact source (a stamp of its files): test runs
# call this script every time, several runs may share one tree, and
# reinstalling under a running pool or pytest breaks its imports.
stamp="$venv/.stepbroker-handlers.stamp"
source_stamp="$(cd "$root/handlers-python" && find pyproject.toml README.md stepbroker_handlers -type f ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)"
# --no-build-isolation: building in a fresh isolated env with its own setuptools
# cost more than the rest of an update. The forced reinstall is for a venv that
# already holds an older build of the same version; a fresh one needs one install.
install() {
  if ! "$venv/bin/python" -c 'import sys, setuptools
sys.exit(tuple(int(x) for x in setuptools.__version__.split(".")[:2]) < (70, 1))' >/dev/null 2>&1; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "setuptools>=70.1"
  fi
  local had=0
  "$venv/bin/python" -c 'import importlib.metadata as m; m.version("stepbroker-handlers")' >/dev/null 2>&1 && had=1
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation "$root/handlers-python[test]"
  if [ "$had" = 1 ]; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps --force-reinstall "$root/handlers-python"
  fi
  echo "$source_stamp" >"$stamp"
}
installed() {
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$source_stamp" ] &&
    "$venv/bin/python" -c 'import stepbroker_handlers, zmq, msgpack, jsonschema, pytest' >/dev/null 2>&1
}
if installed; then
  echo "setup-python: stepbroker-handlers in $venv is up to date with $root/handlers-python"
else
  # one installer at a time when several runs share this tree
  exec 9>"$venv/.setup.lock"
  command -v flock >/dev/null 2>&1 && flock 9
  if ! installed; then install; fi  # (not `installed || install`: that would turn off set -e inside install)
  exec 9>&-
fi

echo "setup-python: installed stepbroker-handlers[test] into $venv:"
"$venv/bin/python" -c 'import importlib.metadata as m
for d in ("stepbroker-handlers", "pyzmq", "msgpack", "jsonschema", "pytest"):
    print("  %s %s" % (d, m.version(d)))'
echo "setup-python: run the tests with: $venv/bin/python -m pytest $root/handlers-python/tests"
