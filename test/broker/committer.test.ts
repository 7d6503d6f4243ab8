/**
 * Defence in depth for the group commit, on a real PostgreSQL: results that
 * the validator would refuse are handed straight to the committer, as a bug
 * in validation would let them through. The batch they poison must still
 * store every other result, the bad ones get an error outcome of their own,
 * and a database that is away makes the committer wait without pinning
 * stop() or the log.
 */
import { strict as assert } from "node:assert";
import { createServer } from "node:net";
import pg from "pg";
import { pino } from "pino";
import {
  COMMIT_IN_FLIGHT,
  Committer,
  UNSTORABLE_RESULT,
  type CommitReport,
  type PendingResult,
  type RefusedResult,
} from "../../broker/completion/Committer";
import { isDataError } from "../../broker/db/errors";
import type { ClaimedStep, CompletionResult } from "../../broker/state/types";
import type { JsonValue } from "../../broker/state/types";
import { useStateManager } from "../support/db";
import { claim, createScenario } from "../support/scenario";
import { eventually } from "../support/stack";

type LogLine = { level: number; msg: string; failures?: number };

function capture(): { logger: pino.Logger; lines: LogLine[] } {
  const lines: LogLine[] = [];
  const logger = pino({ level: "info" }, { write: (l: string) => void lines.push(JSON.parse(l) as LogLine) });
  return { logger, lines };
}

function pending(attemptId: string, output: JsonValue): PendingResult {
  return {
    poolKey: "pool",
    identity: Buffer.from("pool"),
    receivedAt: Date.now(),
    result: { attemptId, status: "complete", output, poolId: "pool" },
  };
}

function nested(depth: number): JsonValue {
  let v: JsonValue = 1;
  for (let i = 0; i < depth; i++) v = [v];
  return v;
}

/** A loopback port that refuses connections: bound, then closed again. */
async function closedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const { port } = server.address() as { port: number };
  await new Promise<void>((r) => server.close(() => r()));
  return port;
}

describe("the committer isolates a result PostgreSQL refuses", function () {
  this.timeout(30_000);
  const t = useStateManager("committer");

  it("stores every other result of the batch and an error outcome for each bad one", async () => {
    const names = Array.from({ length: 10 }, (_, i) => `s${i}`);
    const task = await createScenario(
      t.sm,
      names.map((name) => ({ name, retry: { max_attempts: 3 } })),
    );
    const steps = await claim(t.sm, task, names);
    const byName = new Map(steps.map((s) => [s.step_name, s]));
    // Each of these passes no validator here, and each is refused by jsonb for a different reason.
    const poison: Record<string, JsonValue> = {
      s2: { note: "nul \u0000 inside" },
      s5: { ["key\u0000"]: 1 },
      s7: { text: "lone \ud800 surrogate" },
      s9: nested(20_000),
    };
    const items = names.map((n) => pending(byName.get(n)!.attempt_id, poison[n] ?? { from: n }));

    const { logger, lines } = capture();
    const committed: CommitReport<CompletionResult>[] = [];
    const refused: RefusedResult[] = [];
    let commits = 0;
    const committer = new Committer<CompletionResult>(
      async (part) => {
        commits++;
        return await t.sm.completeAttempts(part.map((p) => p.result));
      },
      64,
      (r) => committed.push(r),
      logger,
      (r) => refused.push(r),
    );
    const started = Date.now();
    for (const item of items) committer.add(item);
    await committer.idle();
    const ms = Date.now() - started;

    const stored = new Map(
      committed.flatMap((r) => r.batch.outcomes.map((o) => [o.attemptId, o.outcome] as const)),
    );
    for (const n of names)
      assert.equal(stored.get(byName.get(n)!.attempt_id), "stored", `${n} is stored and acknowledged`);
    assert.deepEqual(
      refused.map((r) => [r.item.result.attemptId, r.stored]).sort(),
      Object.keys(poison)
        .map((n) => [byName.get(n)!.attempt_id, true])
        .sort(),
      "exactly the four bad results are reported refused, each with an error stored in its place",
    );
    for (const r of refused) assert.ok(isDataError(r.err), `${r.err.message} is a data error`);

    const view = await t.sm.getTask(task.task_id, { includeSteps: true });
    for (const s of view!.steps!) {
      if (s.name in poison) {
        assert.equal(s.state, "ready", `${s.name} goes back to ready for its next attempt`);
        assert.equal(s.error?.type, UNSTORABLE_RESULT, `${s.name}'s error says why`);
      } else {
        assert.equal(s.state, "complete", s.name);
        assert.deepEqual(s.output, { from: s.name });
      }
    }
    // Bounded: halving finds 4 bad results among 10 in a few dozen commits, not a retry loop.
    assert.ok(commits <= 30, `${commits} commits`);
    assert.ok(ms < 10_000, `isolated in ${ms} ms`);
    assert.equal(lines.filter((l) => l.level >= 50).length, 0, "no commit failure is logged as an outage");
  });

  it("retries a batch while the database is away, logs that once, and lets stop() end it", async () => {
    const port = await closedPort();
    const { logger, lines } = capture();
    let attempts = 0;
    let lastError: unknown;
    const committer = new Committer<void>(
      async () => {
        attempts++;
        // A real connection refused, as when PostgreSQL is restarting.
        const client = new pg.Client({ host: "127.0.0.1", port, connectionTimeoutMillis: 2000 });
        try {
          await client.connect();
        } catch (e) {
          lastError = e;
          throw e;
        } finally {
          await client.end().catch(() => undefined);
        }
      },
      64,
      () => assert.fail("nothing can be committed"),
      logger,
      () => assert.fail("a connection failure is not the data's fault"),
    );
    committer.add(pending("00000000-0000-4000-8000-000000000001", { a: 1 }));
    committer.add(pending("00000000-0000-4000-8000-000000000002", { a: 2 }));
    // Three tries are a second of retries, later on a loaded machine: waited for, bounded. Between
    // two tries the results are back in the queue (the pools keep them until ACK); during one they
    // are out of it, so the count is read while the committer pauses, not the moment a try starts.
    await eventually(
      "three tries, and both results back in the queue after them",
      () => (attempts >= 3 && committer.pending === 2 ? true : undefined),
      15_000,
    );
    assert.equal(isDataError(lastError), false, "ECONNREFUSED is not a data error");
    const errors = lines.filter((l) => l.level >= 50);
    assert.equal(
      errors.length,
      1,
      `one log line for the outage, not one per retry: ${JSON.stringify(errors)}`,
    );

    // stop() waits for idle() first: that must not wait for the database.
    const idle = await Promise.race([
      committer.idle().then(() => "idle"),
      new Promise((r) => setTimeout(() => r("hung"), 2000)),
    ]);
    assert.equal(idle, "idle");
    committer.stop();
    await new Promise((r) => setTimeout(r, 100));
    const after = attempts;
    await new Promise((r) => setTimeout(r, 1200));
    assert.equal(attempts, after, "no commit is tried after stop()");
  });
});

/** A result for a claimed step, with what the broker knew of its attempt in flight (its task). */
function flying(step: ClaimedStep, output: JsonValue): PendingResult {
  return {
    ...pending(step.attempt_id, output),
    flight: {
      attemptId: step.attempt_id,
      stepId: step.step_id,
      taskId: step.task_id,
      stepName: step.step_name,
      handler: step.handler,
      attempt: step.attempt,
      maxAttempts: step.max_attempts,
      children: step.children,
      sentAt: Date.now(),
    },
  };
}

describe("the committer keeps two commits in flight on a real PostgreSQL", function () {
  this.timeout(30_000);
  const t = useStateManager("committer_two");

  /**
   * A committer over the real state manager whose first commit is held
   * before it reaches PostgreSQL until `release()`; `commits` lists each
   * commit's attempt ids as it starts.
   */
  function heldFirst(): {
    committer: Committer<CompletionResult>;
    commits: string[][];
    committed: CommitReport<CompletionResult>[];
    firstStarted: Promise<void>;
    release(): void;
  } {
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    let started!: () => void;
    const firstStarted = new Promise<void>((r) => (started = r));
    const commits: string[][] = [];
    const committed: CommitReport<CompletionResult>[] = [];
    const committer = new Committer<CompletionResult>(
      async (part) => {
        commits.push(part.map((p) => p.result.attemptId));
        if (commits.length === 1) {
          started();
          await gate;
        }
        return await t.sm.completeAttempts(part.map((p) => p.result));
      },
      64,
      (r) => committed.push(r),
      capture().logger,
    );
    return { committer, commits, committed, firstStarted, release };
  }

  /** The outcome the committer reported for an attempt, in the order its commits returned. */
  function outcomes(committed: CommitReport<CompletionResult>[], attemptId: string): string[] {
    return committed.flatMap((r) =>
      r.batch.outcomes.filter((o) => o.attemptId === attemptId).map((o) => o.outcome),
    );
  }

  it("commits a result that arrives while a commit is held, without waiting for it", async () => {
    assert.equal(COMMIT_IN_FLIGHT, 2);
    const a = await createScenario(t.sm, [{ name: "a" }]);
    const b = await createScenario(t.sm, [{ name: "b" }]);
    const [sa] = await claim(t.sm, a, ["a"]);
    const [sb] = await claim(t.sm, b, ["b"]);
    const h = heldFirst();
    try {
      h.committer.add(flying(sa!, { from: "a" }));
      await h.firstStarted;
      h.committer.add(flying(sb!, { from: "b" }));
      await eventually("the commit not held", () => (h.committed.length > 0 ? true : undefined));
      assert.deepEqual(
        outcomes(h.committed, sb!.attempt_id),
        ["stored"],
        "b is stored while a's commit is held",
      );
      assert.equal((await t.sm.getTask(b.task_id))?.state, "complete");
    } finally {
      h.release();
    }
    await h.committer.idle();
    assert.deepEqual(outcomes(h.committed, sa!.attempt_id), ["stored"]);
  });

  it("keeps a second copy of an attempt's result for after the commit that holds the first: the first is stored", async () => {
    const a = await createScenario(t.sm, [{ name: "a" }]);
    const b = await createScenario(t.sm, [{ name: "b" }]);
    const [sa] = await claim(t.sm, a, ["a"]);
    const [sb] = await claim(t.sm, b, ["b"]);
    const h = heldFirst();
    try {
      h.committer.add(flying(sa!, { copy: 1 }));
      await h.firstStarted;
      // A pool that sent its result again (say, after a reconnect), and another result behind it.
      h.committer.addAll([flying(sa!, { copy: 2 }), flying(sb!, { from: "b" })]);
      await eventually("the commit not held", () => (h.committed.length > 0 ? true : undefined));
      assert.deepEqual(
        h.commits,
        [[sa!.attempt_id], [sb!.attempt_id]],
        "the second commit left the copy queued behind the commit that holds its attempt",
      );
    } finally {
      h.release();
    }
    await h.committer.idle();
    assert.deepEqual(h.commits.at(-1), [sa!.attempt_id], "the copy went in the commit after");
    assert.deepEqual(outcomes(h.committed, sa!.attempt_id), ["stored", "duplicate"]);
    const view = await t.sm.getTask(a.task_id, { includeSteps: true });
    assert.deepEqual(view?.steps?.[0]?.output, { copy: 1 }, "the first copy's output is the one stored");
  });

  it("keeps a result whose task a commit in flight holds for after it, so two commits never wait on one task", async () => {
    const diamond = await createScenario(t.sm, [{ name: "left" }, { name: "right" }]);
    const other = await createScenario(t.sm, [{ name: "o" }]);
    const steps = await claim(t.sm, diamond, ["left", "right"]);
    const [left, right] = ["left", "right"].map((n) => steps.find((s) => s.step_name === n)!);
    const [so] = await claim(t.sm, other, ["o"]);
    const h = heldFirst();
    try {
      h.committer.add(flying(left!, { side: "left" }));
      await h.firstStarted;
      h.committer.addAll([flying(right!, { side: "right" }), flying(so!, { from: "o" })]);
      await eventually("the commit not held", () => (h.committed.length > 0 ? true : undefined));
      assert.deepEqual(
        h.commits,
        [[left!.attempt_id], [so!.attempt_id]],
        "the other task's result went at once",
      );
    } finally {
      h.release();
    }
    await h.committer.idle();
    assert.deepEqual(h.commits.at(-1), [right!.attempt_id]);
    for (const s of [left!, right!, so!]) assert.deepEqual(outcomes(h.committed, s.attempt_id), ["stored"]);
    assert.equal((await t.sm.getTask(diamond.task_id))?.state, "complete");
  });
});
