/**
 * The Ruby handler SDK's own test suite (minitest, handlers-ruby/test/run.rb),
 * run as part of `npm test`.
 */
import { strict as assert } from "node:assert";
import { describeRun, ensureRuby, runSuite } from "../support/languages";

describe("the Ruby handler SDK", function () {
  let ruby: string;
  before(async function () {
    ruby = await ensureRuby(this);
  });

  it("passes its own minitest suite", async function () {
    this.timeout(200_000);
    const run = await runSuite(ruby, ["handlers-ruby/test/run.rb"], 180_000);
    assert.ok(run.code === 0 && !run.timedOut, describeRun("ruby handlers-ruby/test/run.rb", run));
    assert.match(
      run.output,
      /\d+ runs, \d+ assertions, 0 failures, 0 errors/,
      "minitest reported a clean run",
    );
  });
});
