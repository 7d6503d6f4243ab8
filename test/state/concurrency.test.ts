import assert from "node:assert/strict";
import { TaskStates } from "../../protocol/constants";
import { openDatabase } from "../../broker/db/openDatabase";
import { StateManager } from "../../broker/state/StateManager";
import type { AttemptResult, ClaimedStep } from "../../broker/state/types";
import { databaseUrl, useStateManager } from "../support/db";
import { assertInvariants } from "../support/invariants";

describe("concurrent claimers", () => {
  const t = useStateManager("concurrency");
  const brokers: StateManager[] = [];

  before(async () => {
    // each broker has its own pool, as separate processes would
    for (let i = 0; i < 6; i++) {
      brokers.push(
        new StateManager(await openDatabase({ databaseUrl: databaseUrl(), schema: t.schema, poolSize: 4 })),
      );
    }
  });
  after(async () => {
    await Promise.all(brokers.map((b) => b.close()));
  });

  it("never lets two claimers hold the same step, over many rounds with retries", async function () {
    this.timeout(60_000);
    await t.sm.registerTemplate({
      namespace: "conc",
      name: "chain",
      version: "1",
      steps: [
        { name: "a", handler: "c" },
        { name: "b", handler: "c", depends_on: ["a"] },
        { name: "c", handler: "c", depends_on: ["a"] },
        {
          name: "d",
          handler: "c",
          depends_on: ["b", "c"],
          retry: { max_attempts: 3, backoff: { initial_ms: 0 } },
        },
      ],
    });
    const taskIds = await t.sm.createTasks(
      Array.from({ length: 150 }, (_, i) => ({ namespace: "conc", name: "chain", context: { i } })),
    );
    const claims: (ClaimedStep & { broker: number })[] = [];
    const held = new Map<string, string>(); // step id -> attempt id currently in flight (in this test's view)
    const violations: string[] = [];

    async function work(broker: StateManager, index: number): Promise<void> {
      let idle = 0;
      for (let round = 0; round < 500 && idle < 3; round++) {
        const claimed = await broker.claimSteps({
          brokerId: `broker-${index}`,
          handlers: ["c"],
          limit: 1 + (round % 7),
        });
        if (claimed.length === 0) {
          idle++;
          await new Promise((resolve) => setImmediate(resolve));
          continue;
        }
        idle = 0;
        for (const c of claimed) {
          const other = held.get(c.step_id);
          if (other !== undefined)
            violations.push(`step ${c.step_id} claimed by ${c.attempt_id} while ${other} held it`);
          held.set(c.step_id, c.attempt_id);
          claims.push({ ...c, broker: index });
        }
        const results: AttemptResult[] = claimed.map((c) => {
          held.delete(c.step_id);
          // every "d" fails its first attempt, to mix retries into the race
          return c.step_name === "d" && c.attempt === 1
            ? {
                attemptId: c.attempt_id,
                status: "error",
                error: { type: "Flaky", message: "first try", retryable: true },
              }
            : { attemptId: c.attempt_id, status: "complete", output: { by: index } };
        });
        const { outcomes } = await broker.completeAttempts(results);
        for (const o of outcomes) if (o.outcome !== "stored") violations.push(`${o.attemptId}: ${o.outcome}`);
      }
    }

    // claimers stop after three empty rounds in a row; run until every task is finished (bounded)
    for (let wave = 0; wave < 20; wave++) {
      await Promise.all(brokers.map((b, i) => work(b, i)));
      const [left] = await t.sql<{ n: number }>(
        `select count(*)::int as n from tasks where state <> 'complete'`,
      );
      if (left?.n === 0) break;
    }

    assert.deepEqual(violations, []);
    const [states] = await t.sql<{ complete: number }>(
      `select count(*) filter (where state = 'complete')::int as complete from tasks`,
    );
    assert.equal(states?.complete, taskIds.length);
    // 4 steps per task, "d" twice
    assert.equal(claims.length, taskIds.length * 5);
    assert.equal(new Set(claims.map((c) => c.attempt_id)).size, claims.length, "attempt ids are unique");
    const perStepAttempt = new Set(claims.map((c) => `${c.step_id}#${c.attempt}`));
    assert.equal(perStepAttempt.size, claims.length, "no step ran the same attempt number twice");
    const [rows] = await t.sql<{ n: number; distinct_ids: number }>(
      `select count(*)::int as n, count(distinct attempt_id)::int as distinct_ids from step_attempts`,
    );
    assert.equal(rows?.n, claims.length);
    assert.equal(rows?.distinct_ids, claims.length);
    assert.ok(new Set(claims.map((c) => c.broker)).size > 1, "the work was shared between claimers");
    const tasks = await Promise.all(taskIds.slice(0, 5).map((id) => t.sm.getTask(id)));
    assert.ok(tasks.every((task) => task?.state === TaskStates.COMPLETE));
    await assertInvariants(t);
  });
});
