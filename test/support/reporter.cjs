// The spec reporter, plus one closing line "N passed, N failed, N skipped"
// that CI systems read regardless of the test framework.
//
// With TEST_TIMES=1 it also prints where the wall time went: the 12 slowest
// files (hooks included: a slow before() is as real as a slow test) and the
// 30 slowest tests, so the suite's budget can be watched without a second
// reporter. TEST_TIMES=<path ending in .json> writes every file's and test's
// duration there instead of printing them.
const fs = require("node:fs");
const path = require("node:path");
const Mocha = require("mocha");

const { EVENT_RUN_BEGIN, EVENT_RUN_END, EVENT_TEST_END, EVENT_HOOK_END, EVENT_SUITE_END } =
  Mocha.Runner.constants;

class SpecWithTotals extends Mocha.reporters.Spec {
  constructor(runner, options) {
    super(runner, options);
    const times = process.env.TEST_TIMES;
    const files = new Map();
    const tests = [];
    let last = Date.now();
    // Mocha runs one thing at a time, so the time since the previous event
    // belongs to the file of the event that ends it.
    const charge = (runnable) => {
      const now = Date.now();
      const file = runnable.file ?? "(root hooks)";
      files.set(file, (files.get(file) ?? 0) + (now - last));
      last = now;
    };
    if (times) {
      runner.on(EVENT_RUN_BEGIN, () => (last = Date.now()));
      runner.on(EVENT_HOOK_END, charge);
      runner.on(EVENT_SUITE_END, charge);
      runner.on(EVENT_TEST_END, (test) => {
        charge(test);
        tests.push({ file: test.file, title: test.fullTitle(), ms: test.duration ?? 0 });
      });
    }
    runner.once(EVENT_RUN_END, () => {
      const s = runner.stats;
      if (times) report(times, files, tests);
      process.stdout.write(`\n${s.passes} passed, ${s.failures} failed, ${s.pending} skipped\n`);
    });
  }
}

function report(times, files, tests) {
  const rel = (file) => (file ? path.relative(process.cwd(), file) : "?");
  const fileRows = [...files].map(([file, ms]) => ({ file: rel(file), ms })).sort((a, b) => b.ms - a.ms);
  const testRows = tests.map((t) => ({ ...t, file: rel(t.file) })).sort((a, b) => b.ms - a.ms);
  if (times.endsWith(".json")) {
    fs.writeFileSync(times, JSON.stringify({ files: fileRows, tests: testRows }, null, 1));
    return;
  }
  const secs = (ms) => (ms / 1000).toFixed(1).padStart(6);
  const lines = ["", "slowest files (s, hooks included):"];
  for (const r of fileRows.slice(0, 12)) lines.push(`${secs(r.ms)}  ${r.file}`);
  lines.push("slowest tests (s):");
  for (const r of testRows.slice(0, 30)) lines.push(`${secs(r.ms)}  ${r.title.slice(0, 110)}`);
  process.stdout.write(`${lines.join("\n")}\n`);
}

module.exports = SpecWithTotals;
