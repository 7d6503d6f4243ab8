/**
 * Dispatch and credit without a database: the dispatcher, the result intake
 * and the group commit run against a state port whose every call the test
 * answers by hand, so the interleavings that matter (a claim while a commit
 * runs, a pool that leaves mid-claim, a commit that fails and is retried, a
 * committer that is full) happen exactly when the test says. What the broker
 * would send goes through the real codec and is decoded here.
 */
import { strict as assert } from "node:assert";
import { pino } from "pino";
import { decodeMessage, type CommandName, type HelloBody, type Message } from "../../protocol";
import { createContext, type BrokerContext } from "../../broker/BrokerContext";
import { BatchCommit, type CommittedBatch } from "../../broker/completion/BatchCommit";
import { Committer } from "../../broker/completion/Committer";
import { ResultIntake } from "../../broker/completion/ResultIntake";
import { resolveOptions } from "../../broker/config";
import { DISPATCH_IN_FLIGHT, Dispatcher } from "../../broker/dispatch/Dispatcher";
import { LogLimiter } from "../../broker/LogLimiter";
import { PoolRegistry, type PoolRecord } from "../../broker/pools/PoolRegistry";
import type {
  AttemptResult,
  ChildClaim,
  ClaimedStep,
  CompletionResult,
  StatePort,
} from "../../broker/StatePort";
import type { ClaimRequest } from "../../broker/state/types";
import type { Outbox } from "../../broker/transport/Outbox";

/** A promise the test resolves or rejects when it chooses. */
interface Gate<T> {
  promise: Promise<T>;
  resolve(value: T): void;
  reject(e: Error): void;
}

function gate<T>(): Gate<T> {
  let resolve!: (v: T) => void;
  let reject!: (e: Error) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

/** Waits until `done()` holds, for at most 2 s. */
async function until(done: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + 2000;
  while (!done()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
}

/** The state port, answered by hand: each call waits on a gate the test holds. */
class HandState {
  readonly claims: { request: ClaimRequest; answer: Gate<ClaimedStep[]> }[] = [];
  readonly completions: { results: AttemptResult[]; claim?: ChildClaim; answer: Gate<CompletionResult> }[] =
    [];
  readonly releases: { attemptIds: string[]; countAttempt: boolean }[] = [];

  readonly port = {
    claimSteps: (request: ClaimRequest): Promise<ClaimedStep[]> => {
      const answer = gate<ClaimedStep[]>();
      this.claims.push({ request, answer });
      return answer.promise;
    },
    completeAttempts: (results: AttemptResult[], claim?: ChildClaim): Promise<CompletionResult> => {
      const answer = gate<CompletionResult>();
      this.completions.push({ results, ...(claim ? { claim } : {}), answer });
      return answer.promise;
    },
    releaseAttempts: (attemptIds: string[], options: { countAttempt: boolean }): Promise<unknown[]> => {
      this.releases.push({ attemptIds, countAttempt: options.countAttempt });
      return Promise.resolve([]);
    },
    listenForWork: () => Promise.resolve(() => Promise.resolve()),
  };
}

let nextStep = 0;
function step(children = 0): ClaimedStep {
  const n = ++nextStep;
  return {
    task_id: `00000000-0000-7000-8000-${String(n).padStart(12, "0")}`,
    step_id: `00000000-0000-7000-9000-${String(n).padStart(12, "0")}`,
    attempt_id: `00000000-0000-7000-a000-${String(n).padStart(12, "0")}`,
    step_name: `s${n}`,
    handler: "work",
    attempt: 1,
    max_attempts: 3,
    timeout_ms: 30_000,
    template: { namespace: "test", name: "t", version: "1.0.0" },
    context: {},
    config: {},
    inputs: {},
    lease_expires_at: new Date(Date.now() + 30_000).toISOString(),
    children,
  };
}

function stored(results: AttemptResult[], claimed: ClaimedStep[] = []): CompletionResult {
  return {
    outcomes: results.map((r) => ({ attemptId: r.attemptId, outcome: "stored" as const })),
    readied: [],
    claimed,
    finishedTasks: [],
  };
}

/** Run after each test: harnesses stop their committers (a pause would keep a timer). */
const cleanups: (() => void)[] = [];

interface Harness {
  state: HandState;
  ctx: BrokerContext;
  dispatcher: Dispatcher;
  intake: ResultIntake;
  committer: Committer<CommittedBatch>;
  /** Every message the broker sent, decoded, with the pool it went to. */
  sent: { to: string; message: Message }[];
  lines: { level: number; msg: string }[];
  hello(poolId: string, capacity: number): PoolRecord;
  sentTo(poolId: string, command: CommandName): Message[];
}

function harness(options: { commitBatch?: number; maxPendingResults?: number } = {}): Harness {
  const state = new HandState();
  const lines: { level: number; msg: string }[] = [];
  const log = pino({ level: "info" }, { write: (l: string) => void lines.push(JSON.parse(l) as never) });
  const opts = resolveOptions(
    { endpoints: ["inproc://dispatcher-test"], state: state.port as unknown as StatePort, ...options },
    log,
  );
  const sent: { to: string; message: Message }[] = [];
  // The outbox is the one part replaced: the frames are decoded with the real codec instead of sent.
  const outbox = {
    send(identity: Buffer, frames: Buffer[]) {
      const decoded = decodeMessage(frames);
      assert.ok(decoded.ok, "the broker sent a message its own codec cannot decode");
      sent.push({ to: identity.toString(), message: decoded.message });
    },
  } as unknown as Outbox;
  let running = true;
  const pools = new PoolRegistry();
  const ctx = createContext({
    id: "broker-1",
    opts,
    log,
    pools,
    limiter: new LogLimiter(log),
    outbox,
    lifecycle: () => (running ? "running" : "stopping"),
    kick: (creditOf) => dispatcher.kick(creditOf),
    kickAt: (when) => dispatcher.kickAt(when),
  });
  const dispatcher: Dispatcher = new Dispatcher(ctx, async (pool) => void pools.remove(pool.key));
  const batch = new BatchCommit(
    ctx,
    dispatcher,
    () => undefined,
    () => intake.noteDrained(),
  );
  const committer = new Committer<CommittedBatch>(
    (items) => batch.store(items),
    opts.commitBatch,
    (r) => batch.committed(r),
    log,
    (r) => batch.refused(r),
    opts.maxPendingResults,
  );
  const intake: ResultIntake = new ResultIntake(
    ctx,
    committer,
    (pool) => void pools.remove(pool.key),
    (_pool, e) => {
      throw e;
    },
  );
  cleanups.push(() => {
    running = false;
    committer.stop();
  });
  return {
    state,
    ctx,
    dispatcher,
    intake,
    committer,
    sent,
    lines,
    hello(poolId, capacity) {
      const body: HelloBody = {
        pool_id: poolId,
        handlers: ["work"],
        capacity,
        sdk: { language: "typescript", name: "test", version: "0.0.0" },
      };
      return pools.register(Buffer.from(poolId), body, "json", Date.now());
    },
    sentTo(poolId, command) {
      return sent.filter((s) => s.to === poolId && s.message.command === command).map((s) => s.message);
    },
  };
}

/** Dispatches `steps` to the pool through a claim the test answers, and waits until they are in flight. */
async function dispatch(h: Harness, pool: PoolRecord, steps: ClaimedStep[]): Promise<void> {
  const before = h.state.claims.length;
  h.dispatcher.kick();
  await until(() => h.state.claims.length > before, "a claim");
  h.state.claims[before]!.answer.resolve(steps);
  await until(() => steps.every((s) => pool.inFlight.has(s.attempt_id)), "the steps in flight");
  // A round that filled the credit claims again: those claims find nothing.
  let done = false;
  void h.dispatcher.idle().then(() => (done = true));
  for (let answered = before + 1; !done; await new Promise((r) => setTimeout(r, 2))) {
    if (h.state.claims.length > answered) h.state.claims[answered++]!.answer.resolve([]);
  }
}

/** Answers every claim from index `from` on with nothing until no round runs. */
async function emptyRounds(h: Harness, from: number): Promise<void> {
  let done = false;
  void h.dispatcher.idle().then(() => (done = true));
  for (let answered = from; !done; await new Promise((r) => setTimeout(r, 2))) {
    while (h.state.claims.length > answered) h.state.claims[answered++]!.answer.resolve([]);
  }
}

function complete(attemptIds: string[]): {
  results: { attempt_id: string; status: "complete"; output: null }[];
} {
  return {
    results: attemptIds.map((attempt_id) => ({ attempt_id, status: "complete" as const, output: null })),
  };
}

describe("dispatch and credit, against a state port answered by hand", function () {
  this.timeout(10_000);
  afterEach(() => {
    for (const c of cleanups.splice(0)) c();
  });

  it("claims only the credit that a commit under way has not set aside for its children", async () => {
    const h = harness();
    const pool = h.hello("p1", 16);
    const parent = step(5);
    await dispatch(h, pool, [parent]);
    assert.equal(h.ctx.pools.credit(pool), 15);

    // The parent's result: the commit claims its 5 children for this pool, and sets 5 aside meanwhile.
    h.intake.accept(pool, complete([parent.attempt_id]));
    await until(() => h.state.completions.length === 1, "the commit");
    const commit = h.state.completions[0]!;
    assert.deepEqual(commit.claim?.limit, 5, "the commit claims as many children as the parent has");
    assert.equal(pool.reserved, 5);

    // A dispatch round during the commit claims only what is left: 16 - 5 set aside.
    h.dispatcher.kick();
    await until(() => h.state.claims.length === 2, "a claim during the commit");
    assert.equal(h.state.claims[1]!.request.limit, 11);
    h.state.claims[1]!.answer.resolve([]);
    await h.dispatcher.idle();

    const children = [step(), step(), step(), step(), step()];
    commit.answer.resolve(stored(commit.results, children));
    await until(() => children.every((c) => pool.inFlight.has(c.attempt_id)), "the children in flight");
    assert.equal(pool.reserved, 0, "the children's reservation was settled");
    assert.equal(h.ctx.pools.credit(pool), 11, "16 less the 5 children in flight");
    const stepsSent = h
      .sentTo("p1", "STEP")
      .flatMap((m) => (m.body as { steps: { attempt_id: string }[] }).steps);
    assert.deepEqual(
      stepsSent.map((s) => s.attempt_id),
      [parent.attempt_id, ...children.map((c) => c.attempt_id)],
    );
    const acks = h.sentTo("p1", "ACK");
    assert.deepEqual(acks.at(-1)?.body, { acks: [{ attempt_id: parent.attempt_id, outcome: "stored" }] });
  });

  it("a poll only probes a drained pool, so a result meanwhile still claims its children; a full probe claims the rest at once", async () => {
    const h = harness();
    const pool = h.hello("p1", 64);
    // Proven, with its window grown to its capacity.
    for (let i = 0; i < 3; i++) h.ctx.pools.noteStored(pool);
    const parent = step(2);
    await dispatch(h, pool, [parent]);
    assert.equal(pool.readyDrained, true, "the last claim found no more ready work");

    const before = h.state.claims.length;
    h.dispatcher.kick(undefined, true);
    await until(() => h.state.claims.length > before, "the poll's claim");
    const probe = h.state.claims[before]!;
    assert.equal(probe.request.limit, 16, "a probe, not the 63 free");
    // The parent's result arrives while the probe is in flight: its commit claims both children.
    h.intake.accept(pool, complete([parent.attempt_id]));
    await until(() => h.state.completions.length === 1, "the commit");
    const commit = h.state.completions[0]!;
    assert.equal(commit.claim?.limit, 2, "the probe left the children's credit free");
    probe.answer.resolve([]);
    const children = [step(), step()];
    commit.answer.resolve(stored(commit.results, children));
    await until(() => children.every((c) => pool.inFlight.has(c.attempt_id)), "the children in flight");
    // The returned credit asks for a round of its own: it finds nothing.
    await emptyRounds(h, before + 1);

    // A probe that comes back full found missed work: the next round claims the rest of the credit.
    const claims = h.state.claims.length;
    h.dispatcher.kick(undefined, true);
    await until(() => h.state.claims.length > claims, "the second probe");
    const missed = Array.from({ length: 16 }, () => step());
    h.state.claims[claims]!.answer.resolve(missed);
    await until(() => h.state.claims.length > claims + 1, "the claim after a full probe");
    assert.equal(h.state.claims[claims + 1]!.request.limit, 64 - 2 - 16, "the rest of the credit");
    await emptyRounds(h, claims + 1);

    // Any other reason to dispatch claims the whole credit.
    const last = h.state.claims.length;
    h.dispatcher.kick();
    await until(() => h.state.claims.length > last, "a claim for new work");
    assert.equal(h.state.claims[last]!.request.limit, 64 - 2 - 16);
    await emptyRounds(h, last);
  });

  it("a poll during a claim that drains the queue asks for a probe after it, not another full claim", async () => {
    const h = harness();
    const pool = h.hello("p1", 64);
    for (let i = 0; i < 3; i++) h.ctx.pools.noteStored(pool);
    h.dispatcher.kick(); // a task was created
    await until(() => h.state.claims.length === 1, "the claim for the new task");
    assert.equal(h.state.claims[0]!.request.limit, 64);
    h.dispatcher.kick(undefined, true); // the poll's timer fires meanwhile
    h.state.claims[0]!.answer.resolve([step(2)]);
    await until(() => h.state.claims.length === 2, "the poll's round");
    assert.equal(h.state.claims[1]!.request.limit, 16, "the first claim found the queue drained");
    await emptyRounds(h, 1);
  });

  it("claims at once, in a second round, the credit a claim in flight left, and never the credit it holds", async () => {
    assert.equal(DISPATCH_IN_FLIGHT, 2);
    const h = harness();
    const pool = h.hello("p1", 64);
    for (let i = 0; i < 3; i++) h.ctx.pools.noteStored(pool);
    await dispatch(h, pool, [step()]);
    const before = h.state.claims.length;
    h.dispatcher.kick(undefined, true); // the poll: a probe of a drained pool
    await until(() => h.state.claims.length === before + 1, "the probe");
    const probe = h.state.claims[before]!;
    assert.equal(probe.request.limit, 16);
    h.dispatcher.kick(); // a task was created while the probe runs
    await until(() => h.state.claims.length === before + 2, "a second claim while the probe runs");
    const second = h.state.claims[before + 1]!;
    assert.equal(second.request.limit, 64 - 1 - 16, "what the probe and the step in flight leave");
    assert.equal(pool.reserved, 64 - 1, "both claims' credit set aside");
    h.dispatcher.kick(); // a third reason meanwhile starts no third claim
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(h.state.claims.length, before + 2, "two rounds in flight at most");
    const a = [step(), step()];
    const b = [step(), step(), step()];
    second.answer.resolve(b);
    probe.answer.resolve(a);
    await until(() => [...a, ...b].every((s) => pool.inFlight.has(s.attempt_id)), "both claims in flight");
    await emptyRounds(h, before + 2);
    assert.equal(pool.reserved, 0);
    assert.equal(h.ctx.pools.credit(pool), 64 - 1 - 5);
  });

  it("a round that finds all of a pool's credit held by a claim in flight has that claim's round go again", async () => {
    const h = harness();
    const pool = h.hello("p1", 64);
    for (let i = 0; i < 3; i++) h.ctx.pools.noteStored(pool);
    h.dispatcher.kick();
    await until(() => h.state.claims.length === 1, "the first claim");
    assert.equal(h.state.claims[0]!.request.limit, 64, "it holds all the credit");
    // New work after the claim's statement began: the second round finds no credit and ends.
    h.dispatcher.kick();
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(h.state.claims.length, 1, "no claim without credit");
    // The first claim finds less than its limit (the new work came too late for it): it goes again.
    h.state.claims[0]!.answer.resolve([step()]);
    await until(() => h.state.claims.length === 2, "the claim for the work that came during the first");
    assert.equal(h.state.claims[1]!.request.limit, 16, "a probe: the first found the queue drained");
    const late = [step()];
    h.state.claims[1]!.answer.resolve(late);
    await until(() => pool.inFlight.has(late[0]!.attempt_id), "the late work in flight");
    await emptyRounds(h, 2);
  });

  it("gives back untouched the steps claimed for a pool that left during the claim", async () => {
    const h = harness();
    const pool = h.hello("p1", 16);
    h.dispatcher.kick();
    await until(() => h.state.claims.length === 1, "a claim");
    assert.equal(pool.reserved, 16, "the claim sets the pool's credit aside");
    h.ctx.pools.remove(pool.key);
    const steps = [step(), step(), step()];
    h.state.claims[0]!.answer.resolve(steps);
    await h.dispatcher.idle();
    await until(() => h.state.releases.length === 1, "the release");
    assert.deepEqual(h.state.releases[0], {
      attemptIds: steps.map((s) => s.attempt_id),
      countAttempt: false,
    });
    assert.equal(h.sentTo("p1", "STEP").length, 0, "nothing was sent to the pool that left");
    assert.equal(pool.reserved, 0);
    assert.equal(pool.inFlight.size, 0);
    // The unproven budget is shared: a leak here would starve the next pool.
    const next = h.hello("p2", 16);
    assert.equal(h.ctx.pools.credit(next), 16);
  });

  it("settles a claim's reservation once when the claim fails, and the next round claims the full credit", async () => {
    const h = harness();
    const pool = h.hello("p1", 16);
    h.dispatcher.kick();
    await until(() => h.state.claims.length === 1, "a claim");
    h.state.claims[0]!.answer.reject(
      Object.assign(new Error("connection refused"), { code: "ECONNREFUSED" }),
    );
    await h.dispatcher.idle();
    assert.equal(pool.reserved, 0);
    assert.ok(h.lines.some((l) => l.msg.startsWith("claiming steps failed")));
    h.dispatcher.kick();
    await until(() => h.state.claims.length === 2, "the next claim");
    assert.equal(h.state.claims[1]!.request.limit, 16);
    h.state.claims[1]!.answer.resolve([]);
    await h.dispatcher.idle();
  });

  it("settles a commit's reservation exactly once on failure and again once on the retry's success", async () => {
    const h = harness();
    const pool = h.hello("p1", 16);
    const parent = step(3);
    await dispatch(h, pool, [parent]);
    h.intake.accept(pool, complete([parent.attempt_id]));
    await until(() => h.state.completions.length === 1, "the commit");
    assert.equal(pool.reserved, 3);
    h.state.completions[0]!.answer.reject(
      Object.assign(new Error("the database is away"), { code: "57P01" }),
    );
    await until(() => pool.reserved === 0, "the failed commit's reservation settled");
    // The committer retries the same batch after its pause, with a reservation of its own.
    await until(() => h.state.completions.length === 2, "the retried commit");
    assert.equal(pool.reserved, 3);
    const retry = h.state.completions[1]!;
    assert.deepEqual(
      retry.results.map((r) => r.attemptId),
      [parent.attempt_id],
    );
    retry.answer.resolve(stored(retry.results, []));
    await until(() => h.sentTo("p1", "ACK").length === 1, "the ACK");
    assert.equal(pool.reserved, 0, "settled once: not below zero, not left over");
    assert.equal(h.ctx.pools.credit(pool), 16);
  });

  it("ACKs each result with its own outcome, in the order the state port gives them or in another", async () => {
    const h = harness();
    const pool = h.hello("p1", 16);
    const steps = [step(), step(), step(), step(), step(), step()];
    await dispatch(h, pool, steps);
    const ids = steps.map((s) => s.attempt_id);
    const kinds = ["stored", "stale", "duplicate"] as const;
    // One batch answered in the order given (CompletionResult's promise), one in reverse.
    for (const [batch, order] of [
      [ids.slice(0, 3), (o: unknown[]) => o],
      [ids.slice(3), (o: unknown[]) => [...o].reverse()],
    ] as const) {
      const before = h.state.completions.length;
      const acksBefore = h.sentTo("p1", "ACK").length;
      h.intake.accept(pool, complete(batch));
      await until(() => h.state.completions.length > before, "the commit");
      const commit = h.state.completions[before]!;
      const outcomes = commit.results.map((r, i) => ({ attemptId: r.attemptId, outcome: kinds[i]! }));
      commit.answer.resolve({ ...stored(commit.results), outcomes: order(outcomes) as typeof outcomes });
      await until(() => h.sentTo("p1", "ACK").length > acksBefore, "the ACK");
      const ack = h.sentTo("p1", "ACK")[acksBefore]!.body as {
        acks: { attempt_id: string; outcome: string }[];
      };
      assert.deepEqual(
        ack.acks,
        batch.map((attempt_id, i) => ({ attempt_id, outcome: kinds[i] })),
      );
    }
    assert.equal(pool.stored, 2, "one stored result a batch");
  });

  it("a reservation handle gives its credit back on its first settle() only", () => {
    const h = harness();
    const pool = h.hello("p1", 16);
    const r = h.ctx.pools.reserve(pool, 4);
    assert.equal(h.ctx.pools.credit(pool), 12);
    assert.equal(r.settle(), true);
    assert.equal(r.settle(), false);
    assert.equal(r.settled, true);
    assert.equal(pool.reserved, 0);
    assert.equal(h.ctx.pools.credit(pool), 16);
  });

  it("holds the credit of results that arrive while the committer is full, until they are stored, and says so once", async () => {
    const h = harness({ commitBatch: 1, maxPendingResults: 2 });
    const pool = h.hello("p1", 16);
    const steps = [step(), step(), step(), step(), step(), step()];
    await dispatch(h, pool, steps);
    assert.equal(h.ctx.pools.credit(pool), 10);
    // One result goes to each of the two commits under way; the next two fill the queue to its bound of 2.
    h.intake.accept(pool, complete([steps[0]!.attempt_id]));
    h.intake.accept(pool, complete([steps[1]!.attempt_id]));
    await until(() => h.state.completions.length === 2, "the two commits in flight");
    h.intake.accept(pool, complete([steps[2]!.attempt_id, steps[3]!.attempt_id]));
    assert.equal(h.committer.full, true);
    assert.equal(h.ctx.pools.credit(pool), 14, "credit of results queued below the bound comes back");
    // Past the bound, each new result's credit stays held.
    h.intake.accept(pool, complete([steps[4]!.attempt_id, steps[5]!.attempt_id]));
    assert.equal(h.ctx.pools.credit(pool), 14, "the credit of results past the bound is held");
    assert.equal(pool.reserved, 2);
    const warned = h.lines.filter((l) => l.msg.includes("results await commit"));
    assert.equal(warned.length, 1, "the log says so once");
    for (let i = 0; i < 6; i++) {
      await until(() => h.state.completions.length > i, `commit ${i + 1}`);
      const c = h.state.completions[i]!;
      c.answer.resolve(stored(c.results));
    }
    await until(() => h.sentTo("p1", "ACK").length === 6, "six ACKs");
    assert.equal(pool.reserved, 0, "the held credit came back as the results were stored");
    assert.equal(h.ctx.pools.credit(pool), 16);
    assert.ok(h.lines.some((l) => l.msg.includes("below the bound")));
  });
});
