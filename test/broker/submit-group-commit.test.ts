/**
 * Group commit of SUBMITs, end to end: real clients over tcp://127.0.0.1, a
 * real broker, real PostgreSQL. The broker's state port is the real state
 * manager, watched: the test sees each create statement's requests, and can
 * hold statements open: two statements may be in flight, so with both held
 * the requests sent meanwhile are certain to share the next one. Every outcome is checked per request: its
 * own task and context, idempotency keys inside one statement and across
 * statements, an unknown template, and a task PostgreSQL refuses to store,
 * which fails alone while its neighbours are created.
 */
import { strict as assert } from "node:assert";
import { randomUUID } from "node:crypto";
import { pino } from "pino";
import { Broker } from "../../broker/Broker";
import {
  CREATE_BATCH_ROWS,
  CREATE_BATCH_TASKS,
  CREATE_IN_FLIGHT,
  CREATE_QUEUE_BOUND,
} from "../../broker/clients/CreateBatcher";
import { openDatabase } from "../../broker/db/openDatabase";
import { StateManager } from "../../broker/state/StateManager";
import type { CreateTaskRequest, PreparedTask, StatePort } from "../../broker/StatePort";
import { LOG_LINES_PER_INTERVAL } from "../../broker/LogLimiter";
import { HandlerPool } from "../../handlers-node";
import { StepbrokerClient } from "../../handlers-node/client";
import { databaseUrl, dropSchema, uniqueSchemaName } from "../support/db";
import { assertInvariants } from "../support/invariants";
import { eventually, FAST, silent, stepOf } from "../support/stack";

const ONE = { namespace: "gc", name: "one" };
const WIDE = { namespace: "gc", name: "wide" };
/** A template of this many independent steps: 1 + WIDE_STEPS rows a task. */
const WIDE_STEPS = 1000;

/** Each create statement the broker ran, in order: its tasks' requests and rows. */
interface Statement {
  requests: CreateTaskRequest[];
  rows: number;
}

interface LogLine {
  level: number;
  msg: string;
}

/** A held statement: `reached` resolves once it is running; it goes on after `release()`. */
interface Hold {
  reached: Promise<void>;
  release(): void;
}

/** `p`, or a failure naming `what` once `ms` pass: a held statement that never starts fails fast. */
async function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} within ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([p, late]);
  } finally {
    clearTimeout(timer);
  }
}

function traceparent(n: number): string {
  return `00-${(n + 1).toString(16).padStart(32, "0")}-${"ab".repeat(8)}-01`;
}

describe("SUBMITs share create statements (group commit) over tcp://127.0.0.1", function () {
  this.timeout(60_000);
  const schema = uniqueSchemaName("submit_group");
  let sm: StateManager;
  let broker: Broker;
  let endpoint: string;
  const statements: Statement[] = [];
  const clients: StepbrokerClient[] = [];
  /** Holds for the next create statements, in order: each statement takes the first. */
  const holds: (Hold & { gate: Promise<void>; arrive: () => void })[] = [];
  const lines: LogLine[] = [];

  /** Holds the next create statement (after those already held) until released. */
  function holdNext(): Hold {
    let reached!: () => void;
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const h: Hold & { gate: Promise<void>; arrive: () => void } = {
      reached: new Promise<void>((r) => (reached = r)),
      release,
      gate,
      arrive: () => reached(),
    };
    holds.push(h);
    return h;
  }

  /**
   * Holds both statements a broker may have in flight, each with one task
   * submitted in-process (`contexts`): what is sent next waits for the third.
   * Resolves once both are running.
   */
  async function holdBoth(
    ...requests: [
      Omit<CreateTaskRequest, "namespace" | "name">,
      Omit<CreateTaskRequest, "namespace" | "name">,
    ]
  ): Promise<{ holds: Hold[]; firsts: Promise<{ task: { task_id: string } }>[] }> {
    assert.equal(CREATE_IN_FLIGHT, 2, "this helper holds every statement in flight");
    const held: Hold[] = [];
    const firsts: Promise<{ task: { task_id: string } }>[] = [];
    for (const r of requests) {
      const h = holdNext();
      firsts.push(broker.submit({ ...ONE, ...r }));
      await within(h.reached, 10_000, "no create statement started");
      held.push(h);
    }
    return { holds: held, firsts };
  }

  function client(): StepbrokerClient {
    const c = new StepbrokerClient({ endpoint, requestTimeoutMs: 30_000 });
    clients.push(c);
    return c;
  }

  /** The broker has received (and queued) every message this client sent before: POOLS is answered at once. */
  async function received(c: StepbrokerClient): Promise<void> {
    await c.pools();
  }

  /** How a promise settled: its value, or the error code. */
  function settle<T>(p: Promise<T>): Promise<{ ok: T } | { code: string; message: string }> {
    return p.then(
      (ok) => ({ ok }),
      (e: unknown) => ({
        code: (e as { code?: string }).code ?? String(e),
        message: e instanceof Error ? e.message : String(e),
      }),
    );
  }

  before(async function () {
    this.timeout(30_000);
    const db = await openDatabase({ databaseUrl: databaseUrl(), schema, poolSize: 10 });
    sm = new StateManager(db);
    await sm.migrate();
    await sm.registerTemplate({ ...ONE, version: "1", steps: [{ name: "s", handler: "gc_echo" }] });
    await sm.registerTemplate({
      ...WIDE,
      version: "1",
      steps: Array.from({ length: WIDE_STEPS }, (_, i) => ({ name: `s${i}`, handler: "gc_wide" })),
    });
    const insertCreates = async (prepared: PreparedTask[]): Promise<{ id: string; created: boolean }[]> => {
      statements.push({
        requests: prepared.map((p) => p.request),
        rows: prepared.reduce((n, p) => n + p.rows, 0),
      });
      const h = holds.shift();
      if (h) {
        h.arrive();
        await h.gate;
      }
      return sm.insertCreates(prepared);
    };
    const port = new Proxy(sm, {
      get(target, prop) {
        if (prop === "insertCreates") return insertCreates;
        const v: unknown = Reflect.get(target, prop, target);
        return typeof v === "function" ? (v as (...a: unknown[]) => unknown).bind(target) : v;
      },
    }) as StatePort;
    broker = new Broker({
      endpoints: ["tcp://127.0.0.1:*"],
      state: port,
      brokerId: `test-${schema}`,
      logger: pino({ level: "info" }, { write: (l: string) => void lines.push(JSON.parse(l) as LogLine) }),
      ...FAST,
    });
    await broker.start();
    endpoint = broker.endpoints[0]!;
  });

  beforeEach(() => {
    statements.length = 0;
    lines.length = 0;
  });

  after(async function () {
    this.timeout(30_000);
    for (const h of holds.splice(0)) h.release();
    for (const c of clients) c.close();
    await broker?.stop({ drainMs: 0 });
    try {
      if (sm)
        await assertInvariants({ sql: async (text, values) => (await sm.db.pool.query(text, values)).rows });
    } finally {
      await sm?.close();
      await dropSchema(schema);
    }
  });

  it("creates every task of 400 concurrent SUBMITs from 4 clients in a few statements, each REPLY its own", async () => {
    const CLIENTS = 4;
    const EACH = 100;
    const cs = Array.from({ length: CLIENTS }, client);
    const replies = await Promise.all(
      cs.flatMap((c, ci) =>
        Array.from({ length: EACH }, async (_, n) => {
          const i = ci * EACH + n;
          const out = await c.submit(ONE, { client: ci, n }, { traceparent: traceparent(i) });
          return { i, ci, n, ...out };
        }),
      ),
    );
    for (const r of replies) {
      assert.equal(r.created, true);
      assert.deepEqual(r.task.context, { client: r.ci, n: r.n }, "each REPLY carries its own task");
      assert.equal(r.task.state, "pending");
      assert.deepEqual(
        r.task.steps?.map((s) => [s.name, s.state]),
        [["s", "ready"]],
      );
    }
    assert.equal(new Set(replies.map((r) => r.task.task_id)).size, CLIENTS * EACH, "one task per SUBMIT");
    const rows = await sm.db.pool.query<{
      id: string;
      traceparent: string;
      context: { client: number; n: number };
    }>("select id, traceparent, context from tasks where id = any($1::uuid[])", [
      replies.map((r) => r.task.task_id),
    ]);
    assert.equal(rows.rowCount, CLIENTS * EACH, "every task is in the database");
    const byId = new Map(rows.rows.map((r) => [r.id, r]));
    for (const r of replies) {
      // the trace context stays the task's own, whatever statement it was stored in
      assert.equal(byId.get(r.task.task_id)?.traceparent, traceparent(r.i));
    }
    const created = statements.reduce((n, s) => n + s.requests.length, 0);
    assert.equal(created, CLIENTS * EACH);
    assert.ok(
      statements.length <= (CLIENTS * EACH) / 4,
      `400 SUBMITs that arrive together share statements: ${statements.length} statements`,
    );
    assert.ok(Math.max(...statements.map((s) => s.requests.length)) > 1);
  });

  it("answers a mixed statement per request: an unknown template alone is refused, a duplicate key gets the first task", async () => {
    const c = client();
    // both statements in flight are held, so everything sent meanwhile lands in the next one
    const {
      holds: [h, h2],
      firsts: [first, second],
    } = await holdBoth({ context: { first: true }, idempotencyKey: "gc-k0" }, { context: { second: true } });
    const sent = Promise.all([
      settle(c.submit(ONE, { a: 1 }, { idempotencyKey: "gc-k1" })),
      settle(c.submit(ONE, { a: 2 }, { idempotencyKey: "gc-k1" })),
      settle(c.submit({ namespace: "gc", name: "missing" }, { a: 3 })),
      settle(c.submit(ONE, { a: 4 })),
      settle(c.submit(ONE, { a: 5 }, { idempotencyKey: "gc-k0" })),
      settle(c.submit({ ...ONE, version: "9" }, { a: 6 }, { idempotencyKey: "gc-k9" })),
    ]);
    await received(c);
    // the first statement's end frees its key gc-k0, so its loop takes everything queued
    h!.release();
    const firstOut = await first!;
    h2!.release();
    await second;
    const [a1, a2, missing, a4, a5, v9] = await sent;

    assert.equal(statements.length, 3, "the held statements, then one for every request sent meanwhile");
    assert.deepEqual(
      statements[2]!.requests.map((r) => r.context),
      [{ a: 1 }, { a: 2 }, { a: 4 }, { a: 5 }],
      "the refused requests never reached the statement; the others share it",
    );
    assert.ok("ok" in a1 && a1.ok.created, JSON.stringify(a1));
    assert.ok("ok" in a2, JSON.stringify(a2));
    assert.equal(a2.ok.created, false, "the second request with a key in the same statement was not created");
    assert.equal(a2.ok.task.task_id, a1.ok.task.task_id);
    assert.deepEqual(a2.ok.task.context, { a: 1 }, "it gets the first request's task");
    assert.ok("code" in missing && missing.code === "unknown_template", JSON.stringify(missing));
    assert.ok("code" in v9 && v9.code === "unknown_template", JSON.stringify(v9));
    assert.ok("ok" in a4 && a4.ok.created, JSON.stringify(a4));
    assert.deepEqual(a4.ok.task.context, { a: 4 });
    assert.ok("ok" in a5, JSON.stringify(a5));
    assert.equal(a5.ok.created, false, "a key stored by an earlier statement");
    assert.equal(a5.ok.task.task_id, firstOut.task.task_id);
    assert.deepEqual(a5.ok.task.context, { first: true });

    // across statements, later: the key still names the first task
    const again = await c.submit(ONE, { a: 7 }, { idempotencyKey: "gc-k1" });
    assert.equal(again.created, false);
    assert.equal(again.task.task_id, a1.ok.task.task_id);
    const [count] = (
      await sm.db.pool.query<{ n: number }>(
        "select count(*)::int as n from tasks where idempotency_key in ('gc-k0', 'gc-k1', 'gc-k9')",
      )
    ).rows;
    assert.equal(count?.n, 2);
  });

  it("creates a SUBMIT in a second statement while the first is still running, without waiting for it", async () => {
    const c = client();
    const h = holdNext();
    let firstDone = false;
    const first = broker.submit({ ...ONE, context: { slow: true } }).finally(() => (firstDone = true));
    await within(h.reached, 10_000, "no create statement started");
    try {
      const out = await within(c.submit(ONE, { quick: true }), 10_000, "the second SUBMIT was not answered");
      assert.equal(out.created, true);
      assert.deepEqual(out.task.context, { quick: true });
      assert.equal(firstDone, false, "answered while the first statement is still held");
      assert.deepEqual(
        statements.map((st) => st.requests.map((r) => r.context)),
        [[{ slow: true }], [{ quick: true }]],
      );
    } finally {
      h.release();
    }
    assert.equal((await first).created, true);
  });

  it("keeps a SUBMIT whose key a statement in flight holds for after it, so the first request with a key wins", async () => {
    const c = client();
    const h = holdNext();
    // The first request with the key is held before it reaches PostgreSQL: a second statement
    // that took the later request with the same key would insert it first and win.
    const first = broker.submit({ ...ONE, context: { order: 1 }, idempotencyKey: "gc-split" });
    await within(h.reached, 10_000, "no create statement started");
    let laterDone = false;
    const later = settle(
      c.submit(ONE, { order: 2 }, { idempotencyKey: "gc-split" }).finally(() => (laterDone = true)),
    );
    const other = c.submit(ONE, { order: 3 });
    try {
      const out = await within(other, 10_000, "the SUBMIT without a key was not answered");
      assert.equal(out.created, true, "the second statement ran meanwhile");
      assert.equal(laterDone, false, "the same key waits for the statement that holds it");
      assert.deepEqual(
        statements.map((st) => st.requests.map((r) => r.context)),
        [[{ order: 1 }], [{ order: 3 }]],
        "the second statement left the held key's request queued",
      );
    } finally {
      h.release();
    }
    const firstOut = await first;
    const laterOut = await later;
    assert.equal(firstOut.created, true, "the first request with the key created the task");
    assert.deepEqual(firstOut.task.context, { order: 1 });
    assert.ok("ok" in laterOut, JSON.stringify(laterOut));
    assert.equal(laterOut.ok.created, false);
    assert.equal(laterOut.ok.task.task_id, firstOut.task.task_id, "the later request gets the first's task");
    assert.deepEqual(
      statements[2]?.requests.map((r) => r.context),
      [{ order: 2 }],
      "it went in the statement after",
    );
  });

  it("refuses only the task PostgreSQL cannot store; its neighbours in the statement are created, and a pool then runs a task", async () => {
    const c = client();
    const { holds, firsts } = await holdBoth({ context: { blocker: 1 } }, { context: { blocker: 2 } });
    // U+0000 is refused at the door over the wire (unstorable_value); the in-process API takes it to PostgreSQL
    const sent = Promise.all([
      settle(broker.submit({ ...ONE, context: { g: 1 } })),
      settle(broker.submit({ ...ONE, context: { g: 2 }, idempotencyKey: "gc-nul-ok" })),
      settle(broker.submit({ ...ONE, context: { bad: "a\u0000b" }, idempotencyKey: "gc-nul" })),
      settle(broker.submit({ ...ONE, context: { g: 3 } })),
      settle(c.submit(ONE, { g: 4 })),
    ]);
    await received(c);
    for (const h of holds) h.release();
    await Promise.all(firsts);
    const [g1, g2, bad, g3, g4] = await sent;
    assert.ok("code" in bad, JSON.stringify(bad));
    assert.equal(bad.code, "invalid_request");
    assert.match(bad.message, /PostgreSQL refused to store this task .*SQLSTATE 22P05/);
    for (const [g, n] of [
      [g1, 1],
      [g2, 2],
      [g3, 3],
      [g4, 4],
    ] as const) {
      assert.ok("ok" in g, `g${n}: ${JSON.stringify(g)}`);
      assert.equal(g.ok.created, true);
      assert.deepEqual(g.ok.task.context, { g: n });
    }
    assert.equal(statements[2]!.requests.length, 5, "all five shared a statement first");
    assert.ok(statements.length > 4, "then halves of it, down to the one at fault");
    const [stored] = (
      await sm.db.pool.query<{ n: number }>(
        "select count(*)::int as n from tasks where idempotency_key in ('gc-nul', 'gc-nul-ok')",
      )
    ).rows;
    assert.equal(stored?.n, 1, "the refused task was not stored, its neighbour was");

    const pool = new HandlerPool({ endpoint, poolId: "gc-good", capacity: 2, logger: silent });
    pool.handle("gc_echo", async (step) => ({ echoed: step.context }));
    await pool.start();
    try {
      const { task } = await c.submit(ONE, { after: "refusal" });
      const done = await c.wait(task.task_id, 15_000);
      assert.equal(done.finished, true);
      assert.equal(done.task.state, "complete");
      assert.deepEqual(stepOf(done.task, "s").output, { echoed: { after: "refusal" } });
    } finally {
      await pool.close({ drainMs: 1000 });
    }
  });

  it("answers every request of a statement the database fails with internal_error, logged once, and creates the next", async () => {
    const c = client();
    const N = 40;
    // An uncommitted task holding an idempotency key makes the statement that inserts the same key wait,
    // so the test can cancel it: a failure of the database (SQLSTATE 57014), not of any request's data.
    const locker = await sm.db.pool.connect();
    const canceller = sm.db.newClient();
    await canceller.connect();
    try {
      const [{ pid: lockerPid }] = (await locker.query<{ pid: number }>("select pg_backend_pid() as pid"))
        .rows as [{ pid: number }];
      await locker.query("begin");
      await locker.query(
        "insert into tasks (id, template_id, context, idempotency_key) select $1::uuid, min(id), '{}'::jsonb, 'gc-lock' from task_templates",
        [randomUUID()],
      );
      const { holds, firsts } = await holdBoth({ context: { blocker: 1 } }, { context: { blocker: 2 } });
      const sent = Promise.all([
        settle(c.submit(ONE, { fail: "locked" }, { idempotencyKey: "gc-lock" })),
        ...Array.from({ length: N - 1 }, (_, n) => settle(c.submit(ONE, { fail: n }))),
      ]);
      await received(c);
      for (const h of holds) h.release();
      await Promise.all(firsts);
      let done = false;
      void sent.then(() => (done = true));
      let cancelled = 0;
      await eventually(
        "the waiting statement cancelled and its SUBMITs answered",
        async () => {
          // exactly the statements the uncommitted key holds up
          const r = await canceller.query<{ ok: boolean }>(
            "select pg_cancel_backend(pid) as ok from pg_stat_activity where $1::int = any(pg_blocking_pids(pid))",
            [lockerPid],
          );
          cancelled += r.rows.filter((x) => x.ok).length;
          return done ? true : undefined;
        },
        20_000,
      );
      const out = await sent;
      assert.ok(cancelled >= 1, "a statement waited and was cancelled");
      assert.equal(statements.length, 3, "the held statements, then one for all the others");
      assert.deepEqual(
        [...new Set(out.map((o) => ("code" in o ? o.code : "created")))],
        ["internal_error"],
        "every request of the failed statement gets internal_error",
      );
    } finally {
      await locker.query("rollback").catch(() => undefined);
      locker.release();
      await canceller.end();
    }
    const serve = lines.filter((l) => l.msg.startsWith("failed to serve SUBMIT"));
    assert.equal(serve.length, 1, `one line for ${N} failures in the interval: ${serve.length}`);
    assert.equal(serve[0]!.level, 50);
    const after = await c.submit(ONE, { after: "failure" }, { idempotencyKey: "gc-lock" });
    assert.equal(after.created, true, "nothing of the failed statement was stored");
    assert.deepEqual(after.task.context, { after: "failure" });
  });

  it("lets a small request past a large one that did not fit, but never past an earlier request with its key", async () => {
    const c = client();
    const { holds, firsts } = await holdBoth({ context: { blocker: 1 } }, { context: { blocker: 2 } });
    // CREATE_BATCH_ROWS / (1 + WIDE_STEPS) wide tasks fill a statement; the next wide one and
    // the keyed wide one wait for the statement after. A small task may go past them, but a
    // small task with the keyed one's key must not: it would be created first and win the key.
    const fill = Math.floor(CREATE_BATCH_ROWS / (1 + WIDE_STEPS));
    const wide = Array.from({ length: fill + 1 }, (_, n) => c.submit(WIDE, { n }));
    const keyedWide = c.submit(WIDE, { keyed: "wide" }, { idempotencyKey: "gc-passed" });
    const keyedSmall = c.submit(ONE, { keyed: "small" }, { idempotencyKey: "gc-passed" });
    const small = c.submit(ONE, { small: true });
    await received(c);
    for (const h of holds) h.release();
    await Promise.all(firsts);
    const [wides, first, second, plain] = await Promise.all([
      Promise.all(wide),
      keyedWide,
      keyedSmall,
      small,
    ]);
    assert.ok(wides.every((o) => o.created));
    assert.equal(first.created, true, "the first request with the key created the task");
    assert.deepEqual(first.task.context, { keyed: "wide" });
    assert.equal(second.created, false);
    assert.equal(
      second.task.task_id,
      first.task.task_id,
      "the later request with the key gets the first's task",
    );
    assert.equal(plain.created, true);
    const contexts = statements.slice(2).map((st) => st.requests.map((r) => r.context));
    const firstStatement = contexts[0] ?? [];
    assert.equal(
      firstStatement.length,
      fill + 1,
      "the statement took the wide tasks that fit, and the small one",
    );
    assert.deepEqual(firstStatement.at(-1), { small: true }, "the small task without a key went past");
    assert.ok(
      !firstStatement.some((ctx) => (ctx as { keyed?: string }).keyed !== undefined),
      "neither keyed request went in it",
    );
  });

  it("bounds a statement by tasks and by rows, so large templates make several", async () => {
    const c = client();
    const { holds, firsts } = await holdBoth({ context: { blocker: 1 } }, { context: { blocker: 2 } });
    // more than the queue bound wait behind the held statements
    const SMALL = CREATE_QUEUE_BOUND + 100;
    const WIDES = 20;
    const small = Array.from({ length: SMALL }, (_, n) => c.submit(ONE, { n }));
    const wide = Array.from({ length: WIDES }, (_, n) => c.submit(WIDE, { n }));
    await received(c);
    for (const h of holds) h.release();
    await Promise.all(firsts);
    const out = await Promise.all([...small, ...wide]);
    assert.ok(out.every((o) => o.created));
    assert.equal(new Set(out.map((o) => o.task.task_id)).size, SMALL + WIDES);
    assert.ok(
      out.slice(SMALL).every((o) => o.task.steps?.length === WIDE_STEPS),
      "each wide task has every step",
    );
    const after = statements.slice(2);
    assert.equal(
      after.reduce((n, s) => n + s.requests.length, 0),
      SMALL + WIDES,
    );
    for (const s of after) {
      assert.ok(s.requests.length <= CREATE_BATCH_TASKS, `${s.requests.length} tasks in one statement`);
      assert.ok(s.rows <= CREATE_BATCH_ROWS, `${s.rows} rows in one statement`);
    }
    // 2,148 one-step tasks and 20 of 1,001 rows: at least five statements by tasks, two by rows
    assert.ok(after.length >= 6, `${after.length} statements`);
    const behind = lines.filter((l) => l.msg.includes("SUBMITs wait for PostgreSQL"));
    assert.ok(behind.length >= 1 && behind.length <= LOG_LINES_PER_INTERVAL, `${behind.length} lines`);
    assert.equal(behind[0]!.level, 40);
  });
});
