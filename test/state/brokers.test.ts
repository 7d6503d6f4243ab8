/**
 * Several brokers on one database, at the state level: the brokers table,
 * reclaiming a dead broker's in-flight attempts exactly once among
 * concurrent reclaimers, and the events (cancel, finished) that cross
 * brokers. Each "other broker" is a StateManager with a pool of its own, as a
 * second broker process would have.
 */
import assert from "node:assert/strict";
import { CancelReasons, StepStates, TaskStates } from "../../protocol/constants";
import { openDatabase } from "../../broker/db/openDatabase";
import { BROKER_DEAD_AFTER_MS, summarizeReclaims } from "../../broker/state/BrokerRegistry";
import {
  MAX_EVENT_PAYLOAD_BYTES,
  cancelEventPayloads,
  parseEventPayload,
} from "../../broker/state/EventNotifier";
import { StateManager } from "../../broker/state/StateManager";
import type { BrokerEvent, ClaimedStep, TaskView, WorkNotification } from "../../broker/state/types";
import { databaseUrl, useStateManager } from "../support/db";
import { assertInvariants } from "../support/invariants";
import { claim, createScenario, elapseLease, fail, handlersOf, succeed } from "../support/scenario";

/** A registration for a test broker. */
function broker(brokerId: string): Parameters<StateManager["registerBroker"]>[0] {
  return {
    brokerId,
    endpoints: [`tcp://127.0.0.1:0/${brokerId}`],
    version: "test",
    pid: 4242,
    host: "testhost",
  };
}

/** Resolves when `predicate` holds for the events seen, or fails after `ms`. */
async function eventually(what: string, predicate: () => boolean, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

describe("several brokers on one database", function () {
  this.timeout(60_000);
  const t = useStateManager("brokers");
  /** Two more "brokers": state managers with pools of their own on the same schema. */
  let other: StateManager;
  let third: StateManager;
  before(async () => {
    other = new StateManager(await openDatabase({ databaseUrl: databaseUrl(), schema: t.schema }));
    third = new StateManager(await openDatabase({ databaseUrl: databaseUrl(), schema: t.schema }));
  });
  after(async () => {
    await other?.close();
    await third?.close();
  });
  afterEach(async () => await assertInvariants(t));

  /**
   * The broker heartbeats once more, then dies: its last heartbeat, and the start of the attempts it
   * leases, move `seconds` into the past.
   */
  async function ageBroker(brokerId: string, seconds: number): Promise<void> {
    assert.equal(await t.sm.heartbeatBroker(brokerId), true);
    await t.sql(
      `update brokers set last_heartbeat_at = last_heartbeat_at - $2 * interval '1 second' where broker_id = $1`,
      [brokerId, seconds],
    );
    await t.sql(
      `update steps set lease_started_at = lease_started_at - $2 * interval '1 second' where lease_broker_id = $1`,
      [brokerId, seconds],
    );
  }

  /** A task of `n` independent steps, all claimed under `brokerId`. */
  async function inFlight(n: number, brokerId: string): Promise<{ task: TaskView; claimed: ClaimedStep[] }> {
    const names = Array.from({ length: n }, (_, i) => `s${i}`);
    const task = await createScenario(
      t.sm,
      names.map((name) => ({ name, retry: { max_attempts: 3 } })),
    );
    const claimed = await t.sm.claimSteps({ brokerId, handlers: handlersOf(task), limit: n });
    assert.equal(claimed.length, n);
    return { task, claimed };
  }

  it("registers, heartbeats, lists and stops brokers; a restart under the same id takes the row over", async () => {
    const first = await t.sm.registerBroker(broker("reg-a"));
    await other.registerBroker(broker("reg-b"));
    const { claimed } = await inFlight(2, "reg-a");
    assert.equal(await t.sm.heartbeatBroker("reg-a"), true);
    assert.equal(await t.sm.heartbeatBroker("never-registered"), false, "no row: register again");

    let rows = await third.listBrokers();
    const a = rows.find((r) => r.brokerId === "reg-a");
    assert.ok(a);
    assert.deepEqual(
      {
        endpoints: a.endpoints,
        version: a.version,
        pid: a.pid,
        host: a.host,
        status: a.status,
        alive: a.alive,
      },
      {
        endpoints: ["tcp://127.0.0.1:0/reg-a"],
        version: "test",
        pid: 4242,
        host: "testhost",
        status: "alive",
        alive: true,
      },
    );
    assert.equal(a.inFlight, 2);
    assert.ok(a.heartbeatAgeMs >= 0 && a.heartbeatAgeMs < 5000, `heartbeat age ${a.heartbeatAgeMs}`);
    assert.equal(rows.find((r) => r.brokerId === "reg-b")?.inFlight, 0);

    await t.sql(
      `update brokers set last_heartbeat_at = now() - $1 * interval '1 millisecond' where broker_id = 'reg-b'`,
      [BROKER_DEAD_AFTER_MS + 1000],
    );
    assert.equal(await t.sm.markBrokerStopped("reg-a"), true);
    assert.equal(
      await t.sm.heartbeatBroker("reg-a"),
      false,
      "a stopped row takes no heartbeat: register again",
    );
    rows = await third.listBrokers();
    assert.equal(rows.find((r) => r.brokerId === "reg-a")?.status, "stopped");
    assert.equal(rows.find((r) => r.brokerId === "reg-b")?.status, "dead");
    assert.equal(rows.find((r) => r.brokerId === "reg-b")?.alive, false);
    assert.equal(
      (await third.listBrokers({ deadAfterMs: BROKER_DEAD_AFTER_MS * 10 })).find(
        (r) => r.brokerId === "reg-b",
      )?.status,
      "alive",
      "the bound is the caller's",
    );

    await new Promise((resolve) => setTimeout(resolve, 20));
    const again = await t.sm.registerBroker({ ...broker("reg-a"), endpoints: ["ipc:///tmp/x"], pid: 7 });
    assert.ok(again.startedAt > first.startedAt, "a restart resets started_at");
    const restarted = (await third.listBrokers()).find((r) => r.brokerId === "reg-a");
    assert.deepEqual(
      [restarted?.status, restarted?.stoppedAt, restarted?.endpoints, restarted?.pid],
      ["alive", null, ["ipc:///tmp/x"], 7],
    );
    assert.equal(await t.sm.heartbeatBroker("reg-a"), true);
    // Leave nothing in flight for the tests after this one.
    for (const c of claimed) await succeed(t.sm, c);
  });

  it("reclaims a dead broker's attempts exactly once between two reclaimers started at the same moment", async () => {
    await t.sm.registerBroker(broker("dead-1"));
    await t.sm.registerBroker(broker("live-1"));
    const tasks = await Promise.all(Array.from({ length: 8 }, () => inFlight(25, "dead-1")));
    const live = await inFlight(5, "live-1");
    const deadAttempts = new Set(tasks.flatMap((x) => x.claimed.map((c) => c.attempt_id)));
    assert.equal(deadAttempts.size, 200);
    await ageBroker("dead-1", 30);

    const [fromOther, fromThird] = await Promise.all([
      other.reclaimDeadBrokers({ self: "b-other" }),
      third.reclaimDeadBrokers({ self: "b-third" }),
    ]);
    // SKIP LOCKED may leave a task the other reclaimer was finishing to the next round.
    const later = await other.reclaimDeadBrokers({ self: "b-other" });
    const all = [...fromOther, ...fromThird, ...later].map((r) => r.attemptId);
    assert.equal(all.length, new Set(all).size, "no attempt reclaimed twice");
    assert.deepEqual(new Set(all), deadAttempts, "every attempt of the dead broker, and only those");
    for (const r of [...fromOther, ...fromThird, ...later]) {
      assert.equal(r.fromBrokerId, "dead-1");
      assert.equal(r.state, StepStates.READY);
      assert.ok(r.fromHeartbeatAgeMs !== null && r.fromHeartbeatAgeMs >= 30_000);
    }
    assert.deepEqual(await third.reclaimDeadBrokers({ self: "b-third" }), [], "nothing left");
    assert.match(
      summarizeReclaims(fromOther.length > 0 ? fromOther : fromThird)[0]?.message ?? "",
      /^recovered \d+ attempts from broker dead-1 \(last heartbeat 3\d s ago\)$/,
    );

    const outcomes = await t.sql<{ outcome: string; n: number }>(
      `select outcome, count(*)::int as n from step_attempts where attempt_id = any($1::uuid[]) group by outcome`,
      [[...deadAttempts]],
    );
    assert.deepEqual(outcomes, [{ outcome: "lost", n: 200 }]);
    const events = await t.sql<{ event: string; n: number }>(
      `select event, count(*)::int as n from step_transitions where attempt_id = any($1::uuid[])
       and from_state = 'in_progress' group by event`,
      [[...deadAttempts]],
    );
    assert.deepEqual(events, [{ event: "recovered", n: 200 }]);
    const [counted] = await t.sql<{ attempts: number }>(
      `select min(attempts)::int as attempts from steps where id = any($1::uuid[])`,
      [tasks.flatMap((x) => x.claimed.map((c) => c.step_id))],
    );
    assert.equal(counted?.attempts, 1, "the lost attempt counts");

    // The live broker's attempts were never touched, and it can still finish them.
    for (const c of live.claimed) await succeed(t.sm, c);
    // The reclaimed steps run again under a live broker and their tasks complete.
    for (const x of tasks) {
      const again = await claim(
        t.sm,
        x.task,
        x.claimed.map((c) => c.step_name),
        "live-1",
      );
      for (const c of again) await succeed(t.sm, c);
      assert.equal((await t.sm.getTask(x.task.task_id))?.state, TaskStates.COMPLETE);
    }
  });

  it("leaves a live broker's attempts alone, and a dead one's started after its last heartbeat to their lease", async () => {
    await t.sm.registerBroker(broker("live-2"));
    await t.sm.registerBroker(broker("dead-2"));
    const live = await inFlight(3, "live-2");
    await t.sql(
      `update brokers set last_heartbeat_at = now() - $1 * interval '1 millisecond' where broker_id = 'dead-2'`,
      [BROKER_DEAD_AFTER_MS + 5000],
    );
    // Claimed after dead-2's last heartbeat: proof that it lived on after it (a stall, not a death).
    const afterHeartbeat = await inFlight(2, "dead-2");
    assert.deepEqual(await other.reclaimDeadBrokers({ self: "b-other" }), []);
    // Its own attempts are never the caller's to reclaim, whatever its row says.
    await ageBroker("live-2", 60);
    assert.deepEqual(await other.reclaimDeadBrokers({ self: "live-2" }), []);
    // Once their lease has expired, the lease reaper takes them as usual.
    for (const c of afterHeartbeat.claimed) await elapseLease(t, c.step_id);
    const expired = await other.expireLeases({ self: "b-other" });
    assert.deepEqual(
      expired.map((e) => e.attemptId).sort(),
      afterHeartbeat.claimed.map((c) => c.attempt_id).sort(),
    );
    for (const c of live.claimed) await succeed(t.sm, c);
  });

  it("reclaims at once from a stopped broker, and from a previous life under another id once its lease is long expired", async () => {
    // A broker that stopped cleanly with work still leased (its pools had not answered).
    await t.sm.registerBroker(broker("stopped-3"));
    const stopped = await inFlight(3, "stopped-3");
    await t.sm.heartbeatBroker("stopped-3");
    await t.sm.markBrokerStopped("stopped-3");
    const fromStopped = await other.reclaimDeadBrokers({ self: "b-other" });
    assert.deepEqual(
      fromStopped.map((r) => r.attemptId).sort(),
      stopped.claimed.map((c) => c.attempt_id).sort(),
    );

    // A broker restarted under a new id (e.g. one more --endpoint): the old id has no heartbeat ever
    // again. With a row, the bound applies; without one (an older broker), the lease must have
    // been expired for the whole bound.
    await t.sm.registerBroker(broker("old-id"));
    const oldLife = await inFlight(2, "old-id");
    await t.sm.registerBroker(broker("new-id"));
    const noRow = await inFlight(2, "never-registered");
    await ageBroker("old-id", 11);
    await t.sql(
      `update steps set lease_expires_at = now() - interval '5 seconds' where lease_broker_id = 'never-registered'`,
    );
    const first = await other.reclaimDeadBrokers({ self: "new-id" });
    assert.deepEqual(
      first.map((r) => r.attemptId).sort(),
      oldLife.claimed.map((c) => c.attempt_id).sort(),
      "the old id's work, not yet the unregistered broker's (expired 5 s ago, bound 10 s)",
    );
    await t.sql(
      `update steps set lease_expires_at = now() - interval '11 seconds' where lease_broker_id = 'never-registered'`,
    );
    const second = await other.reclaimDeadBrokers({ self: "new-id" });
    assert.deepEqual(
      second.map((r) => [r.attemptId, r.fromBrokerId, r.fromHeartbeatAgeMs]).sort(),
      noRow.claimed.map((c) => [c.attempt_id, "never-registered", null]).sort(),
    );
    assert.match(
      summarizeReclaims(second)[0]?.message ?? "",
      /from broker never-registered \(it has no brokers row\)/,
    );
    for (const x of [stopped, oldLife, noRow]) {
      const again = await claim(
        t.sm,
        x.task,
        x.claimed.map((c) => c.step_name),
        "new-id",
      );
      for (const c of again) await succeed(t.sm, c);
    }
  });

  it("keeps an attempt a pool adopted at a live broker while the reclaimer was choosing", async () => {
    await t.sm.registerBroker(broker("dead-4"));
    const { claimed } = await inFlight(2, "dead-4");
    await ageBroker("dead-4", 30);
    const [kept, lost] = claimed;
    assert.ok(kept && lost);
    // The adoption commits while the reclaimer waits for the step lock (held here).
    const holder = await t.db.pool.connect();
    try {
      await holder.query("begin");
      await holder.query("select 1 from steps where id = $1 for update", [kept.step_id]);
      const reclaiming = other.reclaimDeadBrokers({ self: "b-other" });
      await new Promise((resolve) => setTimeout(resolve, 300));
      await holder.query(`update steps set lease_broker_id = 'adopter' where id = $1`, [kept.step_id]);
      await holder.query("commit");
      const reclaimed = await reclaiming;
      assert.deepEqual(
        reclaimed.map((r) => r.attemptId),
        [lost.attempt_id],
      );
    } finally {
      holder.release();
    }
    await succeed(t.sm, kept);
    const [again] = await claim(t.sm, (await t.sm.getTask(kept.task_id, { includeSteps: true }))!, [
      lost.step_name,
    ]);
    assert.ok(again);
    await succeed(t.sm, again);
  });

  it("expires each lease once when brokers reap every broker's leases at the same moment, and tells the lease's broker", async () => {
    const heard: BrokerEvent[] = [];
    const stop = await third.listenForEvents((e) => heard.push(e));
    try {
      const a = await inFlight(30, "reap-a");
      const b = await inFlight(30, "reap-b");
      const all = [...a.claimed, ...b.claimed];
      await t.sql(
        `update steps set lease_expires_at = now() - interval '1 second' where id = any($1::uuid[])`,
        [all.map((c) => c.step_id)],
      );
      const [byOther, byThird] = await Promise.all([
        other.expireLeases({ self: "reap-a" }),
        third.expireLeases({ self: "reap-b" }),
      ]);
      const taken = [...byOther, ...byThird].map((x) => x.attemptId);
      assert.equal(taken.length, 60);
      assert.deepEqual(new Set(taken), new Set(all.map((c) => c.attempt_id)));
      // Each reaper announced the other brokers' attempts it took (not its own) as a timeout cancel.
      const announced = (): string[] =>
        heard
          .flatMap((e) => (e.kind === "cancel" && e.reason === CancelReasons.TIMEOUT ? e.attempts : []))
          .map((x) => `${x.brokerId}:${x.attemptId}`);
      const expected = [
        ...byOther.filter((x) => x.brokerId !== "reap-a"),
        ...byThird.filter((x) => x.brokerId !== "reap-b"),
      ].map((x) => `${x.brokerId}:${x.attemptId}`);
      await eventually("the timeout cancels", () => announced().length >= expected.length);
      assert.deepEqual(announced().sort(), expected.sort());
      for (const x of [a, b]) {
        const again = await claim(
          t.sm,
          x.task,
          x.claimed.map((c) => c.step_name),
        );
        for (const c of again) await succeed(t.sm, c);
      }
    } finally {
      await stop();
    }
  });

  it("tells every broker of a cancel (each attempt with its broker) and of finished tasks, each listener once", async () => {
    const local: BrokerEvent[] = [];
    const remote: BrokerEvent[] = [];
    const stopLocal = await t.sm.listenForEvents((e) => local.push(e));
    const stopRemote = await other.listenForEvents((e) => remote.push(e));
    try {
      // Cancelled here while its steps run under broker "far": "far" learns which attempts to CANCEL.
      const { task, claimed } = await inFlight(3, "far");
      await t.sm.cancelTask(task.task_id);
      const cancelOf = (seen: BrokerEvent[]): string[] =>
        seen
          .flatMap((e) =>
            e.kind === "cancel" && e.reason === CancelReasons.TASK_CANCELLED ? e.attempts : [],
          )
          .map((a) => `${a.brokerId}:${a.taskId}:${a.attemptId}`)
          .sort();
      const expected = claimed.map((c) => `far:${task.task_id}:${c.attempt_id}`).sort();
      const finishedOf = (seen: BrokerEvent[], taskId: string): string[] =>
        seen.flatMap((e) => (e.kind === "finished" && e.taskId === taskId ? [e.state] : []));
      await eventually("the cancel at the other broker", () => finishedOf(remote, task.task_id).length > 0);
      assert.deepEqual(cancelOf(remote), expected);
      assert.deepEqual(finishedOf(remote, task.task_id), [TaskStates.CANCELLED]);
      // Ours arrived directly, once committed; the NOTIFY echo is skipped. Notifications arrive in
      // commit order, so once a later change of the other broker is here, an echo would be too.
      const fence = await createScenario(other, [{ name: "fence" }]);
      await other.cancelTask(fence.task_id);
      await eventually("the fence", () => finishedOf(local, fence.task_id).length > 0);
      assert.deepEqual(cancelOf(local), expected);
      assert.deepEqual(finishedOf(local, task.task_id), [TaskStates.CANCELLED]);

      // Finished under the other broker: a WAIT held here answers at once.
      const done = await createScenario(t.sm, [{ name: "only" }]);
      const [step] = await other.claimSteps({ brokerId: "far", handlers: handlersOf(done), limit: 1 });
      assert.ok(step);
      await succeed(other, step);
      await eventually("the finished event here", () => finishedOf(local, done.task_id).length > 0);
      assert.deepEqual(finishedOf(local, done.task_id), [TaskStates.COMPLETE]);
      assert.deepEqual(finishedOf(remote, done.task_id), [TaskStates.COMPLETE], "its own, directly");

      // An operator's resolve on the other broker that ends a failed task.
      const failing = await createScenario(t.sm, [{ name: "f", retry: { max_attempts: 1 } }]);
      const [f] = await claim(t.sm, failing, ["f"]);
      assert.ok(f);
      await fail(t.sm, f, { retryable: false });
      await eventually("the error here", () => finishedOf(local, failing.task_id).length > 0);
      await other.resolveStep(f.step_id, { fixed: true });
      await eventually("the resolution here", () => finishedOf(local, failing.task_id).length > 1);
      assert.deepEqual(finishedOf(local, failing.task_id), [TaskStates.ERROR, TaskStates.COMPLETE]);
      await eventually("both at the other broker", () => finishedOf(remote, failing.task_id).length > 1);
      assert.deepEqual(finishedOf(remote, failing.task_id), [TaskStates.ERROR, TaskStates.COMPLETE]);

      // A cancel too big for one NOTIFY arrives as several, every attempt once.
      const big = await inFlight(400, "a-broker-with-a-rather-long-id-on-host-and-endpoints");
      await t.sm.cancelTask(big.task.task_id);
      const bigExpected = big.claimed.map((c) => c.attempt_id).sort();
      const bigOf = (seen: BrokerEvent[]): string[] =>
        seen
          .flatMap((e) => (e.kind === "cancel" ? e.attempts : []))
          .filter((a) => a.taskId === big.task.task_id)
          .map((a) => a.attemptId)
          .sort();
      await eventually("the big cancel", () => bigOf(remote).length >= bigExpected.length);
      assert.deepEqual(bigOf(remote), bigExpected);
      assert.ok(remote.filter((e) => e.kind === "cancel").length > 2, "split into several NOTIFYs");
      assert.deepEqual(bigOf(local), bigExpected);
    } finally {
      await stopLocal();
      await stopRemote();
    }
  });

  it("splits payloads under PostgreSQL's limit and ignores malformed ones", () => {
    assert.deepEqual(parseEventPayload("not json"), []);
    assert.deepEqual(parseEventPayload('{"kind":"cancel","reason":"bogus","attempts":[["a","b","c"]]}'), []);
    assert.deepEqual(
      parseEventPayload('{"kind":"finished","tasks":[{"task_id":"x","state":"nonsense"}]}'),
      [],
    );
    const attempts = Array.from({ length: 1000 }, (_, i) => ({
      attemptId: `00000000-0000-0000-0000-${String(i).padStart(12, "0")}`,
      taskId: "00000000-0000-0000-0000-000000000000",
      brokerId: "b".repeat(40),
    }));
    const payloads = cancelEventPayloads(CancelReasons.TASK_CANCELLED, attempts);
    assert.ok(payloads.length > 1);
    for (const p of payloads) assert.ok(Buffer.byteLength(p) < MAX_EVENT_PAYLOAD_BYTES, `${p.length} bytes`);
    const back = payloads.flatMap(parseEventPayload).flatMap((e) => (e.kind === "cancel" ? e.attempts : []));
    assert.deepEqual(back, attempts);
  });

  it("hears work and events on one LISTEN connection", async () => {
    const work: WorkNotification[] = [];
    const events: BrokerEvent[] = [];
    const stop = await t.sm.listen({ onWork: (n) => work.push(n), onEvent: (e) => events.push(e) });
    try {
      const connections = await t.sql<{ query: string }>(
        `select query from pg_stat_activity where query like 'listen %' and query like $1`,
        [`%${t.schema}%`],
      );
      assert.deepEqual(
        connections.map((c) => c.query),
        [`listen "${t.sm.eventsChannel}"`],
        "one connection, its last statement the second LISTEN",
      );
      const task = await createScenario(other, [{ name: "a" }]);
      await eventually("the work notification", () => work.some((n) => n.reason === "created"));
      await other.cancelTask(task.task_id);
      await eventually("the finished event", () =>
        events.some((e) => e.kind === "finished" && e.taskId === task.task_id),
      );
    } finally {
      await stop();
    }
  });

  it("wakes every broker's dispatch for an operator's retry or resolve on another", async () => {
    const work: WorkNotification[] = [];
    const stop = await t.sm.listen({ onWork: (n) => work.push(n) });
    try {
      const task = await createScenario(t.sm, [
        { name: "a", retry: { max_attempts: 1 } },
        { name: "b", depends_on: ["a"] },
      ]);
      const [a] = await claim(t.sm, task, ["a"]);
      assert.ok(a);
      await fail(t.sm, a, { retryable: false });
      await other.retry({ stepId: a.step_id });
      await eventually("the retry", () => work.some((n) => n.reason === "retried"));
      const [again] = await claim(t.sm, task, ["a"]);
      assert.ok(again);
      await fail(t.sm, again, { retryable: false });
      await other.resolveStep(a.step_id, null);
      await eventually("the resolution", () => work.some((n) => n.reason === "resolved"));
      const [b] = await claim(t.sm, task, ["b"]);
      assert.ok(b);
      await succeed(t.sm, b);
    } finally {
      await stop();
    }
  });

  it("listens for events again after its connection is cut, and says some may have been missed", async () => {
    const seen: BrokerEvent[] = [];
    const stop = await t.sm.listenForEvents((e) => seen.push(e));
    const listening = `listen "${t.sm.eventsChannel}"`;
    const cut = async (): Promise<boolean[]> =>
      (
        await t.sql<{ ok: boolean }>(
          "select pg_terminate_backend(pid) as ok from pg_stat_activity where query = $1 and pid <> pg_backend_pid()",
          [listening],
        )
      ).map((r) => r.ok);
    try {
      assert.deepEqual(await cut(), [true]);
      await eventually("the reconnect", () => seen.some((e) => e.kind === "reconnected"));
      const { task } = await inFlight(1, "far");
      await other.cancelTask(task.task_id);
      await eventually("an event after the reconnect", () =>
        seen.some((e) => e.kind === "finished" && e.taskId === task.task_id),
      );
    } finally {
      await stop();
    }
    const left = await t.sql("select pid from pg_stat_activity where query = $1", [listening]);
    assert.equal(left.length, 0, "no connection left listening");
  });
});
