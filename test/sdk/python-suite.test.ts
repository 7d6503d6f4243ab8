/**
 * The Python handler SDK's own test suite (pytest, in the venv that
 * scripts/setup-python.sh makes), run as part of `npm test`.
 */
import { strict as assert } from "node:assert";
import { describeRun, ensurePython, runSuite } from "../support/languages";

describe("the Python handler SDK", function () {
  let python: string;
  before(async function () {
    python = await ensurePython(this);
  });

  it("passes its own pytest suite", async function () {
    this.timeout(200_000);
    const run = await runSuite(
      python,
      ["-m", "pytest", "-q", "-p", "no:cacheprovider", "handlers-python/tests"],
      180_000,
      {
        PYTHONDONTWRITEBYTECODE: "1",
      },
    );
    assert.ok(run.code === 0 && !run.timedOut, describeRun("pytest handlers-python/tests", run));
    assert.match(run.output, /\d+ passed/, "pytest reported the tests it passed");
  });
});
