#!/usr/bin/env bash
# `npm run check`: the type check, the import-cycle check, the file-name guard,
# eslint and prettier. They read the tree and write nothing, so they run in two
# lanes at once (each is single-threaded and two cores sat half idle for the
# ~50 s of CPU they take one after another). Each command's output is printed
# whole, in the order below, once all have ended; the exit status is non-zero
# when any of them failed, naming which.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

names=(tsc cycles check:names eslint prettier)
commands=(
  "tsc --noEmit"
  "npm run -s cycles"
  "npm run -s check:names"
  "eslint ."
  "prettier --check ."
)
# Lanes of roughly equal CPU: the type check with the two small checks, the linters.
lanes=("0 1 2" "3 4")

out="$(mktemp -d "${TMPDIR:-/tmp}/stepbroker-check-XXXXXX")"
trap 'rm -rf "$out"' EXIT

run_lane() {
  local i
  for i in $1; do
    bash -c "${commands[$i]}" >"$out/$i.log" 2>&1
    echo $? >"$out/$i.status"
  done
}

pids=()
for lane in "${lanes[@]}"; do
  run_lane "$lane" &
  pids+=($!)
done
wait "${pids[@]}"

failed=()
for i in "${!commands[@]}"; do
  echo "> ${commands[$i]}"
  cat "$out/$i.log"
  [ "$(cat "$out/$i.status" 2>/dev/null)" = "0" ] || failed+=("${names[$i]}")
done
if [ "${#failed[@]}" -ne 0 ]; then
  echo "check: failed: ${failed[*]}" >&2
  exit 1
fi
