/**
 * The broker keeps the history tables' partitions (Maintenance.historyTick):
 * it creates them ahead at start, before it claims; with retention on, its
 * tick deletes finished tasks past the retention; and a failure to create
 * them is logged, once, and does not keep it from serving.
 */
import assert from "node:assert/strict";
import { pino } from "pino";
import { Broker } from "../../broker/Broker";
import { HandlerPool } from "../../handlers-node";
import { FAST, eventually, silent, useBrokerStack } from "../support/stack";

const DAY = 86_400_000;

function daySuffix(offset: number): string {
  return new Date(Date.now() + offset * DAY).toISOString().slice(0, 10).replaceAll("-", "");
}

type Line = { level: number; msg: string };

describe("the broker and the history partitions (inproc://)", function () {
  this.timeout(60_000);
  const stack = useBrokerStack("hpart_broker", "inproc", { historyDaysAhead: 4 });
  const template = {
    namespace: "hp",
    name: "one",
    version: "1",
    steps: [{ name: "s", handler: "hp_echo" }],
  };

  /** Runs one task to completion through a well-behaved in-process pool. */
  async function runOne(): Promise<string> {
    const pool = new HandlerPool({ endpoint: stack.endpoint, capacity: 1, logger: silent });
    pool.handle("hp_echo", async (step) => ({ got: step.context }));
    await pool.start();
    try {
      const { task } = await stack.broker.submit({ namespace: "hp", name: "one", context: { n: 1 } });
      assert.equal((await stack.waitForTask(task.task_id)).state, "complete");
      return task.task_id;
    } finally {
      await pool.close({ drainMs: 1000 });
    }
  }

  before(async () => await stack.registerTemplate(template));

  it("creates the partitions of the next days at start", async () => {
    const names = (await stack.sm.listHistoryPartitions()).map((p) => p.partitionName);
    for (const table of ["step_transitions", "task_transitions", "step_attempts"])
      for (const d of [1, 2, 3, 4])
        assert.ok(names.includes(`${table}_p${daySuffix(d)}`), `${table} day +${d}`);
    assert.ok(!names.some((n) => n.endsWith(daySuffix(5))), "no more than historyDaysAhead");
  });

  it("with retention on, its tick deletes the tasks that finished longer ago than the retention", async () => {
    const old = await runOne();
    await stack.sql(
      `update tasks set created_at = created_at - interval '3 days', finished_at = finished_at - interval '3 days' where id = $1`,
      [old],
    );
    const kept = await runOne();
    await stack.broker.stop({ drainMs: 0 });
    await stack.startBroker({ historyDaysAhead: 4, historyRetentionDays: 1, partitionCheckMs: 100 });
    await eventually("the old task is deleted", async () =>
      (await stack.sm.getTask(old)) === null ? true : undefined,
    );
    assert.equal((await stack.sm.getTask(kept))?.state, "complete", "a task within the retention stays");
    assert.equal(
      (await stack.sql(`select 1 from step_transitions where task_id = $1`, [old])).length,
      0,
      "with its history",
    );
  });

  it("logs a failure to create a partition once and still serves", async () => {
    // a plain table where a partition must go: ensure refuses it, every tick
    await stack.sql(`create table step_transitions_p${daySuffix(5)} (x int)`);
    try {
      await stack.broker.stop({ drainMs: 0 });
      const lines: Line[] = [];
      const logger = pino(
        { level: "info" },
        { write: (l: string) => void lines.push(JSON.parse(l) as Line) },
      );
      const broker: Broker = await stack.startBroker({
        ...FAST,
        logger,
        historyDaysAhead: 5,
        partitionCheckMs: 50,
      });
      assert.equal(broker, stack.broker);
      await runOne();
      await new Promise((r) => setTimeout(r, 300));
      const failures = lines.filter((l) => l.msg.startsWith("history partition maintenance failed"));
      assert.equal(failures.length, 1, `once per interval: ${failures.map((l) => l.msg).join("\n")}`);
      assert.equal(failures[0]!.level, 50);
      assert.match(failures[0]!.msg, /exists but is not a partition of step_transitions/);
    } finally {
      await stack.sql(`drop table step_transitions_p${daySuffix(5)}`);
    }
  });
});
