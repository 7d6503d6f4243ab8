/**
 * A Python or Ruby handler that returns what the broker cannot store (U+0000
 * in a string, 60 levels of nesting) fails its step on the first attempt with
 * the pool's own `invalid_output`, stored by the broker, instead of a RESULT
 * the broker refuses and the pool resends until the lease runs out. A handler
 * whose exception message holds U+0000 has that error stored (with U+FFFD).
 * Either way the same pool then completes a well-behaved step.
 */
import { strict as assert } from "node:assert";
import { randomBytes } from "node:crypto";
import { join } from "node:path";
import { ensurePython, ensureRuby, pythonTestPoolArgs, rubyTestPoolArgs } from "../support/languages";
import { eventually, spawnPool, stepOf, useBrokerStack, type ChildPool } from "../support/stack";

const KINDS = ["nul", "deep", "raise"] as const;
const LANGS = ["python", "ruby"] as const;

/** What the stored error says, per kind: the same words from every SDK. */
const EXPECTED: Record<(typeof KINDS)[number], { type: string; message: string }> = {
  nul: {
    type: "invalid_output",
    message:
      "the handler's output cannot be stored: at /text, a string holds U+0000 " +
      "(PostgreSQL stores no U+0000 or unpaired surrogate; send bytes as base64)",
  },
  deep: {
    type: "invalid_output",
    message: `the handler's output cannot be stored: at ${"/0".repeat(56)}, nesting deeper than 56 levels`,
  },
  // The class name: Stepbroker::PermanentError in Ruby.
  raise: { type: "PermanentError", message: "bad \ufffd byte" },
};

describe("Python and Ruby pools and an output the broker cannot store", function () {
  this.timeout(60_000);
  const stack = useBrokerStack("unstorable", "tcp");
  const pools: ChildPool[] = [];
  let python: string;
  let ruby: string;

  before(async function () {
    python = await ensurePython(this);
    ruby = await ensureRuby(this);
    for (const lang of LANGS) {
      // The Ruby test pool serves built-ins under their own names only, so each language gets its own template
      // and only one pool runs at a time.
      for (const kind of KINDS)
        await stack.registerTemplate({
          namespace: "unstorable",
          name: `${lang}_${kind}`,
          version: "1",
          steps: [{ name: "bad", handler: "unstorable", config: { kind }, retry: { max_attempts: 3 } }],
        });
    }
    await stack.registerTemplate({
      namespace: "unstorable",
      name: "fine",
      version: "1",
      steps: [{ name: "ok", handler: "echo" }],
    });
  });
  afterEach(async function () {
    this.timeout(30_000);
    await Promise.all(pools.splice(0).map((p) => p.stop()));
  });

  for (const lang of LANGS) {
    it(`stores the ${lang} pool's error on the first attempt, then the pool completes a good step`, async () => {
      const poolId = `${lang}-unstorable-${randomBytes(3).toString("hex")}`;
      const args = [
        "--handlers",
        "unstorable,echo",
        "--capacity",
        "2",
        "--pool-id",
        poolId,
        "--encoding",
        "msgpack",
      ];
      pools.push(
        lang === "python"
          ? await spawnPool(
              python,
              pythonTestPoolArgs(
                stack.endpoint,
                join(stack.tmp, `py-state-${randomBytes(3).toString("hex")}`),
                args,
              ),
            )
          : await spawnPool(ruby, rubyTestPoolArgs(stack.endpoint, [...args, "--log-level", "fatal"])),
      );
      await eventually(`pool ${poolId} to be welcomed`, () =>
        stack.broker.listPools().some((p) => p.pool_id === poolId) ? true : undefined,
      );
      for (const kind of KINDS) {
        const { task } = await stack.broker.submit({
          namespace: "unstorable",
          name: `${lang}_${kind}`,
          context: {},
        });
        const done = await stack.waitForTask(task.task_id, 30_000);
        assert.equal(done.state, "error", `${kind}: ${JSON.stringify(done)}`);
        const step = stepOf(done, "bad");
        assert.equal(
          step.error?.type?.replace(/^Stepbroker::/, ""),
          EXPECTED[kind].type,
          `${kind}: ${JSON.stringify(step.error)}`,
        );
        assert.equal(step.error?.message, EXPECTED[kind].message, kind);
        assert.equal(step.error?.retryable, false, kind);
        const attempts = await stack.sm.getAttempts(task.task_id);
        assert.equal(attempts.length, 1, `${kind}: not retried, since the same output would come back`);
      }
      const { task } = await stack.broker.submit({
        namespace: "unstorable",
        name: "fine",
        context: { n: 1 },
      });
      const done = await stack.waitForTask(task.task_id, 30_000);
      assert.equal(done.state, "complete", JSON.stringify(done));
      assert.deepEqual((stepOf(done, "ok").output as { context?: unknown }).context, { n: 1 });
    });
  }
});
