/**
 * bench/profileSummary.ts over a hand-made profile whose answer is known:
 * self time, inclusive time (a recursive frame counted once per sample), and
 * the window between the first and last sample that has a function on its stack.
 */
import { strict as assert } from "node:assert";
import { summarizeProfile } from "../../bench/profileSummary";

const frame = (functionName: string, url = "file:///app/x.js", lineNumber = 0) => ({
  functionName,
  url,
  lineNumber,
});

// root -> (idle); root -> loop -> work -> work (recursion); root -> start
const profile = {
  nodes: [
    { id: 1, callFrame: frame("(root)", ""), children: [2, 3, 6] },
    { id: 2, callFrame: frame("(idle)", "") },
    { id: 3, callFrame: frame("loop"), children: [4] },
    { id: 4, callFrame: frame("work", "file:///app/x.js", 9), children: [5] },
    { id: 5, callFrame: frame("work", "file:///app/x.js", 9) },
    { id: 6, callFrame: frame("start") },
  ],
  // start 100 µs, then idle 50, work(outer) 200, work(inner) 300, idle 400, start 25
  samples: [6, 2, 4, 5, 2, 6],
  timeDeltas: [100, 50, 200, 300, 400, 25],
};

describe("bench profileSummary", function () {
  it("sums self time by function and file, and says how much of the window was busy", function () {
    const s = summarizeProfile(profile, { cwd: "/app" });
    assert.equal(s.windowMs, 1.075);
    assert.equal(s.busyMs, 0.625);
    const ms = Object.fromEntries(s.rows.map((r) => [r.where, r.ms]));
    assert.deepEqual(ms, { "work x.js:10": 0.5, "(idle) :1": 0.45, "start x.js:1": 0.125 });
  });

  it("counts a recursive function once per sample in inclusive time", function () {
    const s = summarizeProfile(profile, { cwd: "/app", inclusive: true });
    const ms = Object.fromEntries(s.rows.map((r) => [r.where, r.ms]));
    assert.equal(ms["work x.js:10"], 0.5);
    assert.equal(ms["loop x.js:1"], 0.5);
    assert.equal(ms["(root) :1"], 1.075);
  });

  it("keeps only the samples from the first to the last with the window function on the stack", function () {
    const s = summarizeProfile(profile, { cwd: "/app", window: "loop" });
    assert.equal(s.windowMs, 0.5);
    assert.deepEqual(
      s.rows.map((r) => r.where),
      ["work x.js:10"],
    );
    assert.throws(() => summarizeProfile(profile, { window: "absent" }), /no sample has absent/);
  });
});
