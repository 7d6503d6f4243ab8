/**
 * HEARTBEAT `cancelling` from the Python and Ruby pools, seen by a real
 * broker over tcp: a handler that ignores its CANCEL keeps its slot counted
 * against the pool's credit until it returns, so the broker sends that pool
 * no new work meanwhile; once it returns, the pool completes new work.
 *
 * Each SDK's test pool (a child process) serves the built-in `hang`, which
 * sleeps `config.ms` ignoring cancel, with capacity 1.
 */
import { strict as assert } from "node:assert";
import { randomBytes } from "node:crypto";
import { join } from "node:path";
import { ensurePython, ensureRuby, pythonTestPoolArgs, rubyTestPoolArgs } from "../support/languages";
import { eventually, spawnPool, useBrokerStack, type ChildPool } from "../support/stack";

/**
 * The stuck step's lease. A CANCEL that reaches the pool before the handler has started drops the
 * attempt unstarted (nothing lingers, nothing is listed in `cancelling`), so the lease must outlast
 * the way from claim to a running handler even on a loaded machine (with 300 ms, two full CI runs
 * never saw the handler listed; run alone, the test passed).
 */
const LEASE_MS = 2000;
/** How long the stuck handler runs: well past its lease, its CANCEL and a HEARTBEAT listing it. */
const HANG_MS = 6000;

const STUCK = {
  namespace: "cancelling",
  name: "stuck",
  version: "1",
  steps: [
    {
      name: "stuck",
      handler: "hang",
      timeout_ms: LEASE_MS,
      config: { ms: HANG_MS },
      retry: { max_attempts: 1 },
    },
  ],
};

const QUICK = {
  namespace: "cancelling",
  name: "quick",
  version: "1",
  steps: [{ name: "quick", handler: "echo" }],
};

describe("HEARTBEAT cancelling from the Python and Ruby pools (broker, tcp)", function () {
  this.timeout(60_000);
  const stack = useBrokerStack("sdkcancelling", "tcp");
  const pools: ChildPool[] = [];
  const runtimes: { python?: string; ruby?: string } = {};

  before(async function () {
    runtimes.python = await ensurePython(this);
    runtimes.ruby = await ensureRuby(this);
    await stack.registerTemplate(STUCK);
    await stack.registerTemplate(QUICK);
  });
  afterEach(async function () {
    this.timeout(30_000);
    await Promise.all(pools.splice(0).map((p) => p.stop()));
  });

  const spawners: Record<"python" | "ruby", (poolId: string) => Promise<ChildPool>> = {
    python: (poolId) =>
      spawnPool(
        runtimes.python!,
        pythonTestPoolArgs(stack.endpoint, join(stack.tmp, `py-state-${poolId}`), [
          "--handlers",
          "hang,echo",
          "--capacity",
          "1",
          "--pool-id",
          poolId,
        ]),
      ),
    ruby: (poolId) =>
      spawnPool(
        runtimes.ruby!,
        rubyTestPoolArgs(stack.endpoint, [
          "--handlers",
          "hang,echo",
          "--capacity",
          "1",
          "--pool-id",
          poolId,
          "--log-level",
          "warn",
        ]),
      ),
  };

  for (const language of ["python", "ruby"] as const) {
    it(`${language}: a timed-out handler that keeps running holds its slot until it returns`, async () => {
      const poolId = `${language}-${randomBytes(3).toString("hex")}`;
      pools.push(await spawners[language](poolId));
      const view = () => stack.broker.listPools().find((p) => p.pool_id === poolId);
      await eventually(`${poolId} to be welcomed`, view);

      const { task: stuck } = await stack.broker.submit({
        namespace: "cancelling",
        name: "stuck",
        context: {},
      });
      const failed = await stack.waitForTask(stuck.task_id);
      assert.equal(failed.state, "error", "its only attempt timed out");
      // The broker learns of the stuck handler from the pool's HEARTBEAT `cancelling`.
      await eventually("the pool to report its stuck handler", () =>
        view()?.cancelling === 1 ? true : undefined,
      );
      assert.equal(view()?.in_flight, 0, "the broker cancelled the attempt");

      // Capacity 1, one slot held: the next step waits until the handler returns.
      const { task: quick } = await stack.broker.submit({
        namespace: "cancelling",
        name: "quick",
        context: {},
      });
      const done = await stack.waitForTask(quick.task_id, 20_000);
      assert.equal(done.state, "complete", JSON.stringify(done));
      await eventually("the returned handler to free its slot", () =>
        view()?.cancelling === 0 ? true : undefined,
      );

      const [stuckAttempt] = await stack.sm.getAttempts(stuck.task_id);
      const [quickAttempt] = await stack.sm.getAttempts(quick.task_id);
      assert.ok(stuckAttempt && quickAttempt, "one attempt each");
      assert.equal(quickAttempt.poolId, poolId);
      const waited = Date.parse(quickAttempt.startedAt) - Date.parse(stuckAttempt.startedAt);
      // Started (claimed) only after the stuck handler, dispatched before it, had run HANG_MS.
      assert.ok(
        waited >= HANG_MS,
        `the quick step was dispatched ${waited} ms after the stuck one, before its handler returned`,
      );
    });
  }
});
