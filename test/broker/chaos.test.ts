/**
 * A bounded chaos run: two brokers (child processes, one schema) and Node
 * pools (child processes: some on one broker, one on both) run a few hundred
 * diamonds while, at seeded random moments, a broker is killed with SIGKILL
 * and restarted on its endpoint (under its own id or a new one), a pool is
 * killed with SIGKILL and a fresh one started, and PostgreSQL is restarted
 * once. At the end every task is complete, the history is whole
 * (assertInvariants), each complete step has exactly one complete attempt,
 * and every output is the one the diamond computes from its parents'.
 *
 * The seed is printed; CHAOS_SEED=<n> replays a run's schedule (the timing of
 * the processes themselves is not replayable, the schedule is).
 *
 * PostgreSQL is a dedicated embedded server in a temporary directory, not the
 * run's shared one: restarting that one would cut every other suite's
 * connections, and it may be an external server (DATABASE_URL) this test
 * must not stop.
 */
import { strict as assert } from "node:assert";
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { startEmbeddedPostgres, type EmbeddedServer } from "../../broker/db/embedded";
import { openDatabase } from "../../broker/db/openDatabase";
import { BROKER_DEAD_AFTER_MS, BROKER_RECLAIM_INTERVAL_MS } from "../../broker/state/BrokerRegistry";
import { StateManager } from "../../broker/state/StateManager";
import { freeTcpEndpoint, spawnBrokerProcess, type BrokerProcess } from "../support/brokerProcess";
import { uniqueSchemaName } from "../support/db";
import { assertInvariants } from "../support/invariants";
import { eventually, spawnNodePool, type ChildPool } from "../support/stack";

const NS = "chaos";
const TASKS = 300;
/** Tasks are submitted over this window so that work is in flight whenever a fault strikes. */
const SUBMIT_WINDOW_MS = 24_000;
const BATCH = 10;
/**
 * After the last submission and the last fault: a broker restarted under a new id leaves
 * its previous life's attempts to the dead-broker reclaim (BROKER_DEAD_AFTER_MS + one look),
 * plus a margin for a machine shared with other test runs.
 */
const SETTLE_MS = BROKER_DEAD_AFTER_MS + BROKER_RECLAIM_INTERVAL_MS + 20_000;
const STEP_TIMEOUT_MS = 30_000;

const DIAMOND = {
  namespace: NS,
  name: "diamond",
  version: "1",
  steps: [
    { name: "a", handler: "chaos_echo" },
    { name: "b", handler: "chaos_echo", depends_on: ["a"] },
    { name: "c", handler: "chaos_echo", depends_on: ["a"] },
    { name: "d", handler: "chaos_echo", depends_on: ["b", "c"] },
  ].map((s) => ({
    ...s,
    // far beyond the handlers' few ms: no lease expires in a healthy run, faults bring work back
    timeout_ms: STEP_TIMEOUT_MS,
    retry: { max_attempts: 6, backoff: { initial_ms: 50, multiplier: 2, max_ms: 1000 } },
  })),
};
const PARENTS: Record<string, string[]> = { a: [], b: ["a"], c: ["a"], d: ["b", "c"] };

/** mulberry32: small, seedable, good enough to pick moments and victims. */
function prng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function chaosSeed(): number {
  const given = process.env.CHAOS_SEED;
  if (given !== undefined && given !== "") {
    const n = Number(given);
    if (!Number.isInteger(n) || n < 0)
      throw new Error(`CHAOS_SEED must be a non-negative integer, not ${given}`);
    return n;
  }
  return Math.floor(Math.random() * 2 ** 31);
}

type Fault = { at: number; kind: "broker" | "pool" | "postgres" };

/** Two broker kills, two pool kills and one PostgreSQL restart, at seeded moments within the submit window. */
function schedule(rand: () => number): Fault[] {
  const at = (): number => Math.round(2000 + rand() * (SUBMIT_WINDOW_MS - 3000));
  const faults: Fault[] = [
    { at: at(), kind: "broker" },
    { at: at(), kind: "broker" },
    { at: at(), kind: "pool" },
    { at: at(), kind: "pool" },
    { at: at(), kind: "postgres" },
  ];
  return faults.sort((x, y) => x.at - y.at);
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

type Echo = {
  inputs: Record<string, unknown>;
  context: Record<string, unknown>;
  step: { taskId: string; stepId: string; attemptId: string; stepName: string };
};

describe("chaos: two brokers, pools, kill -9 and a PostgreSQL restart (child processes, tcp://127.0.0.1)", function () {
  this.timeout(180_000);
  let dir: string | undefined;
  let server: EmbeddedServer | undefined;
  let sm: StateManager | undefined;
  const children: { stop(): Promise<void>; kill9(): Promise<void> }[] = [];
  const logs: [string, () => string][] = [];

  afterEach(async function () {
    this.timeout(60_000);
    if (this.currentTest?.state === "failed") {
      for (const [who, text] of logs) process.stderr.write(`\n--- ${who} ---\n${text()}\n`);
    }
    logs.length = 0;
    // SIGKILL: a graceful stop would wait on a database that may be the cause of the failure
    for (const c of children.splice(0)) await c.kill9().catch(() => undefined);
    await sm?.close().catch(() => undefined);
    sm = undefined;
    await server?.stop().catch(() => undefined);
    server = undefined;
    if (dir !== undefined) await fs.rm(dir, { recursive: true, force: true });
    dir = undefined;
  });

  it("completes every diamond exactly once, with whole history, through broker, pool and database faults", async () => {
    const seed = chaosSeed();
    // two streams, so that the schedule and its victims do not depend on how submission interleaves
    const rand = prng(seed);
    const work = prng(seed ^ 0x5bd1e995);
    const faults = schedule(rand);
    process.stdout.write(
      `      chaos seed ${seed} (CHAOS_SEED=${seed} replays it): ${faults.map((f) => `${f.kind}@${f.at}ms`).join(", ")}\n`,
    );

    dir = await fs.mkdtemp(path.join(os.tmpdir(), "stepbroker-chaos-"));
    // as root the server runs as user postgres, which must be able to enter the directory
    await fs.chmod(dir, 0o755);
    const dataDir = path.join(dir, "pgdata");
    const pgFlags = ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "max_connections=200"];
    server = await startEmbeddedPostgres({ dataDir, postgresFlags: pgFlags });
    const url = server.url;
    const schema = uniqueSchemaName("chaos");
    sm = new StateManager(await openDatabase({ databaseUrl: url, schema, poolSize: 4 }));
    await sm.migrate();
    await sm.registerTemplate(DIAMOND);
    const state = sm;
    const sql = async <R extends Record<string, unknown>>(text: string, values?: unknown[]): Promise<R[]> =>
      (await state.db.pool.query<R>(text, values)).rows;

    const env = { DATABASE_URL: url, STEPBROKER_LOG_LEVEL: "info" };
    let lives = 0;
    const startBroker = async (endpoint: string, brokerId: string): Promise<BrokerProcess> => {
      const b = await spawnBrokerProcess({ endpoint, schema, brokerId, env, timeoutMs: 30_000 });
      children.push(b);
      logs.push([`broker ${brokerId} (life ${++lives})`, () => b.stderr()]);
      return b;
    };
    const endpoints = [await freeTcpEndpoint(), await freeTcpEndpoint()];
    const ids = ["chaos-a", "chaos-b"];
    const brokers = await Promise.all([
      startBroker(endpoints[0]!, ids[0]!),
      startBroker(endpoints[1]!, ids[1]!),
    ]);

    let pools_started = 0;
    const startPool = async (on: string[]): Promise<ChildPool> => {
      const poolId = `chaos-pool-${++pools_started}`;
      const p = await spawnNodePool(
        on[0]!,
        [
          ...on.slice(1).flatMap((e) => ["--endpoint", e]),
          "--handlers",
          "chaos_echo=slow_echo",
          "--capacity",
          "4",
          "--pool-id",
          poolId,
        ],
        30_000,
      );
      children.push(p);
      return p;
    };
    // on A, on B, on both (one DEALER per broker), and one more on A
    const placements = [[endpoints[0]!], [endpoints[1]!], [...endpoints], [endpoints[0]!]];
    const pools = await Promise.all(placements.map((on) => startPool(on)));

    // Submission: batches spread over the window, each with idempotency keys so a batch
    // retried after a database error (committed or not) never makes a task twice.
    const t0 = Date.now();
    const taskIds: string[] = [];
    let submitErrors = 0;
    const submitting = (async () => {
      const batches = TASKS / BATCH;
      for (let i = 0; i < batches; i++) {
        const due = t0 + (i * SUBMIT_WINDOW_MS) / batches;
        if (due > Date.now()) await sleep(due - Date.now());
        const requests = Array.from({ length: BATCH }, (_, j) => {
          const n = i * BATCH + j;
          return {
            namespace: NS,
            name: "diamond",
            context: { n, sleep_ms: 10 + Math.floor(work() * 190) },
            idempotencyKey: `chaos-${seed}-${n}`,
          };
        });
        for (;;) {
          try {
            taskIds.push(...(await state.createTasks(requests)));
            break;
          } catch {
            submitErrors++;
            if (Date.now() - t0 > SUBMIT_WINDOW_MS + 30_000)
              throw new Error("could not submit through the outage");
            await sleep(200);
          }
        }
      }
    })();

    // Faults, in order; each finishes (the process is back, the database answers) before the next.
    const done = { brokerKills: 0, sameId: 0, newId: 0, poolsDiedWithBroker: 0, poolKills: 0, pgRestarts: 0 };
    let pgDownMs = 0;
    const inFlight: string[] = [];
    const faulting = (async () => {
      for (const f of faults) {
        const due = t0 + f.at;
        if (due > Date.now()) await sleep(due - Date.now());
        const [busy] = await sql<{ n: string }>(
          `select count(*) as n from steps where state = 'in_progress'`,
        );
        inFlight.push(`${f.kind}@${Date.now() - t0}ms:${busy!.n}`);
        if (f.kind === "broker") {
          const i = rand() < 0.5 ? 0 : 1;
          await brokers[i]!.kill9();
          done.brokerKills++;
          // Sometimes a pool of that broker alone dies with it: no pool is left to re-send or
          // re-announce its attempts, so only a broker's recovery (its own id's, or the
          // dead-broker reclaim for a new id) brings them back.
          const orphaned =
            rand() < 0.5 ? placements.findIndex((on) => on.length === 1 && on[0] === endpoints[i]) : -1;
          if (orphaned >= 0) {
            await pools[orphaned]!.kill9();
            done.poolsDiedWithBroker++;
          }
          await sleep(Math.round(rand() * 1500));
          // a restart under a new id is what adding an endpoint to the default id gives
          if (rand() < 0.5) done.sameId++;
          else {
            done.newId++;
            ids[i] = `${ids[i]!.split("~")[0]!}~${done.brokerKills}`;
          }
          brokers[i] = await startBroker(endpoints[i]!, ids[i]!);
          if (orphaned >= 0) pools[orphaned] = await startPool(placements[orphaned]!);
        } else if (f.kind === "pool") {
          const i = Math.floor(rand() * pools.length);
          await pools[i]!.kill9();
          done.poolKills++;
          pools[i] = await startPool(placements[i]!);
        } else {
          const [before] = await sql<{ started: Date }>(`select pg_postmaster_start_time() as started`);
          const down = Date.now();
          await server!.stop();
          server = await startEmbeddedPostgres({ dataDir, postgresFlags: pgFlags });
          assert.equal(server.url, url, "the restarted server answers at the same URL");
          await eventually(
            "PostgreSQL to answer again",
            () =>
              sql("select 1").then(
                () => true,
                () => undefined,
              ),
            20_000,
          );
          pgDownMs = Date.now() - down;
          const [after] = await sql<{ started: Date }>(`select pg_postmaster_start_time() as started`);
          assert.ok(after!.started > before!.started, "a new postmaster: the restart was real");
          done.pgRestarts++;
        }
      }
    })();
    await Promise.all([submitting, faulting]);
    // a broker that died by itself (not by our kill) is a finding, not noise: say which and how
    for (const [i, b] of brokers.entries()) {
      assert.equal(
        b.child.exitCode ?? b.child.signalCode,
        null,
        `broker ${ids[i]} died on its own: ${b.stderr()}`,
      );
    }
    assert.equal(taskIds.length, TASKS);
    assert.equal(new Set(taskIds).size, TASKS, "one task per idempotency key");

    const settleFrom = Date.now();
    const unfinished = async (): Promise<number> =>
      Number(
        (
          await sql<{ n: string }>(
            `select count(*) as n from tasks where id = any($1::uuid[]) and state not in ('complete', 'error', 'cancelled')`,
            [taskIds],
          )
        )[0]!.n,
      );
    let left = await unfinished();
    while (left > 0 && Date.now() - settleFrom < SETTLE_MS) {
      await sleep(250);
      left = await unfinished();
    }
    const settledMs = Date.now() - settleFrom;
    if (left > 0) {
      const stuck = await sql(
        `select t.id as task_id, s.name, s.state, s.attempts, s.lease_broker_id, s.lease_expires_at
         from tasks t join steps s on s.task_id = t.id
         where t.id = any($1::uuid[]) and t.state not in ('complete', 'error', 'cancelled') and s.state <> 'complete'
         limit 20`,
        [taskIds],
      );
      assert.fail(
        `${left} of ${TASKS} tasks not finished ${SETTLE_MS} ms after the last fault (seed ${seed}): ${JSON.stringify(stuck)}`,
      );
    }
    const byState = await sql<{ state: string; n: string }>(
      `select state, count(*) as n from tasks where id = any($1::uuid[]) group by state`,
      [taskIds],
    );
    assert.deepEqual(
      byState.map((r) => [r.state, Number(r.n)]),
      [["complete", TASKS]],
      `seed ${seed}: handlers never fail, so every task completes`,
    );

    await assertInvariants({ sql });
    // exactly one complete attempt per step, and it is the attempt whose answer is stored
    const steps = await sql<{
      task_id: string;
      step_id: string;
      name: string;
      context: Record<string, unknown>;
      output: Echo;
      complete_attempts: string[];
    }>(
      `select s.task_id, s.id as step_id, s.name, t.context, s.output,
              array(select a.attempt_id::text from step_attempts a
                    where a.step_id = s.id and a.outcome = 'complete') as complete_attempts
       from steps s join tasks t on t.id = s.task_id where s.task_id = any($1::uuid[])`,
      [taskIds],
    );
    assert.equal(steps.length, TASKS * 4);
    const outputs = new Map(steps.map((s) => [`${s.task_id}/${s.name}`, s.output]));
    for (const s of steps) {
      const where = `seed ${seed}, task ${s.task_id} step ${s.name}`;
      assert.equal(s.complete_attempts.length, 1, `${where}: one complete attempt`);
      assert.equal(
        s.output.step.attemptId,
        s.complete_attempts[0],
        `${where}: the stored output is its complete attempt's`,
      );
      assert.equal(s.output.step.stepId, s.step_id, where);
      assert.deepEqual(s.output.context, s.context, `${where}: the task's context`);
      const expected = Object.fromEntries(PARENTS[s.name]!.map((p) => [p, outputs.get(`${s.task_id}/${p}`)]));
      assert.deepEqual(s.output.inputs, expected, `${where}: its inputs are its parents' stored outputs`);
    }

    const outcomes = await sql<{ outcome: string; n: string }>(
      `select coalesce(a.outcome, 'open') as outcome, count(*) as n from step_attempts a
       where a.task_id = any($1::uuid[]) group by 1 order by 1`,
      [taskIds],
    );
    const retried = await sql<{ n: string }>(
      `select count(*) as n from steps where task_id = any($1::uuid[]) and attempts > 1`,
      [taskIds],
    );
    // how work came back: released (its pool went away), recovered (a dead or restarted broker's), timed_out
    const returned = await sql<{ event: string; n: string }>(
      `select event, count(*) as n from step_transitions
       where task_id = any($1::uuid[]) and from_state = 'in_progress' and to_state = 'ready' group by 1 order by 1`,
      [taskIds],
    );
    process.stdout.write(
      `      chaos seed ${seed}: ${Date.now() - t0} ms in all (settled ${settledMs} ms after the last fault), ` +
        `${done.brokerKills} broker kills (${done.sameId} same id, ${done.newId} new id, ` +
        `${done.poolsDiedWithBroker} with a pool of theirs), ${done.poolKills} pool kills, ` +
        `${done.pgRestarts} PostgreSQL restart (${pgDownMs} ms), ${submitErrors} submit retries; ` +
        `steps in flight when struck: ${inFlight.join(" ")}; attempts: ` +
        `${outcomes.map((o) => `${o.outcome} ${o.n}`).join(", ")}; ${retried[0]!.n} steps ran more than once; back to ready by ` +
        `${returned.map((r) => `${r.event} ${r.n}`).join(", ") || "nothing"}\n`,
    );
    assert.deepEqual(
      done,
      { ...done, brokerKills: 2, poolKills: 2, pgRestarts: 1 },
      "every scheduled fault happened",
    );
  });
});
