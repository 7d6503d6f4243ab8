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

if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
  echo "setup-python: using existing venv $venv ($("$venv/bin/python" --version 2>&1))"
else
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  if ! "$python" -m venv "$venv"; then
    echo "setup-python: '$python -m venv' failed; on Debian/Ubuntu install python3-venv." >&2
    exit 1
  fi
  echo "setup-python: created venv $venv ($("$venv/bin/python" --version 2>&1))"
fi

# A non-editable install: the tests exercise the package as users get it.
# --force-reinstall of the package only, so edits are picked up. Skipped when
# the venv already holds this exact source (a stamp of its files): test runs
# call this script every time, several runs may share one tree, and
# reinstalling under a running pool or pytest breaks its imports.
stamp="$venv/.stepbroker-handlers.stamp"
source_stamp="$(cd "$root/handlers-python" && find pyproject.toml README.md stepbroker_handlers -type f ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)"
install() {
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$root/handlers-python[test]"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall "$root/handlers-python"
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
