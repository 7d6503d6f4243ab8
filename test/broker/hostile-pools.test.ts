/**
 * Pools that try to take each other's work, and pools that take work and
 * never answer. A real broker on a real PostgreSQL, raw ZeroMQ DEALERs over
 * tcp:// as the hostile peers. Each impersonation test checks the refusal (the
 * ERROR code with the attempt id, and a log line naming both pool ids) and
 * that the victim's honest result is the one stored; the swarm test checks
 * that every task of an honest pool completes.
 */
import { strict as assert } from "node:assert";
import { randomBytes } from "node:crypto";
import { pino } from "pino";
import { Context, Dealer } from "zeromq";
import { Broker } from "../../broker/Broker";
import { PROBE_BUDGET } from "../../broker/pools/PoolRegistry";
import { HandlerPool } from "../../handlers-node";
import { encodeMessage, type ErrorCode } from "../../protocol";
import { RawPeer, type Incoming } from "../support/rawPeer";
import { eventually, silent, stepOf, useBrokerStack } from "../support/stack";

/** A pool is purged after HEARTBEAT_MS × HEARTBEAT_LIVENESS of silence: long enough to act in between. */
const HEARTBEAT_MS = 250;
const HEARTBEAT_LIVENESS = 8;
const RAW_HEARTBEAT_MS = 50;

type LogLine = {
  level: number;
  msg: string;
  pool_id?: string;
  owner_pool_id?: string;
  routing_id?: string;
  attempt_id?: string;
  command?: string;
};

interface Step {
  attempt_id: string;
  task_id: string;
  step_id: string;
  attempt: number;
}

function session(): string {
  return randomBytes(24).toString("base64url");
}

describe("pools that take each other's work, or swallow it", function () {
  this.timeout(60_000);
  const logs: LogLine[] = [];
  const logger = pino(
    { level: "info" },
    { write: (line: string) => void logs.push(JSON.parse(line) as LogLine) },
  );
  const stack = useBrokerStack("hostile_pools", "tcp", {
    heartbeatMs: HEARTBEAT_MS,
    heartbeatLiveness: HEARTBEAT_LIVENESS,
    logger,
  });
  const cleanups: (() => Promise<void> | void)[] = [];
  let counter = 0;

  afterEach(async () => {
    while (cleanups.length) await cleanups.pop()!();
  });

  function peer(id?: string, endpoint = stack.endpoint): RawPeer {
    const p = RawPeer.connect(endpoint, id);
    cleanups.push(() => p.close());
    return p;
  }

  function hello(
    p: RawPeer,
    handler: string,
    opts: { poolId?: string; session?: string; running?: string[] } = {},
  ): Promise<void> {
    return p.send("HELLO", {
      pool_id: opts.poolId ?? p.id,
      handlers: [handler],
      capacity: 4,
      sdk: { language: "node", name: "raw-test-peer", version: "0" },
      ...(opts.session ? { session: opts.session } : {}),
      ...(opts.running ? { running: opts.running } : {}),
    });
  }

  /** A welcomed, heartbeating victim pool with its session secret, holding one attempt of a new task. */
  /** A second broker on the same database that has seen none of this file's pools; stopped after the test. */
  async function secondBroker(): Promise<Broker> {
    const other = new Broker({
      endpoints: ["tcp://127.0.0.1:*"],
      state: stack.sm,
      brokerId: `other-${counter}`,
      logger,
      heartbeatMs: HEARTBEAT_MS,
      heartbeatLiveness: HEARTBEAT_LIVENESS,
      recoveryGraceMs: 60_000,
    });
    await other.start();
    cleanups.push(() => other.stop({ drainMs: 0 }));
    return other;
  }

  async function victimWithAttempt(): Promise<{
    victim: RawPeer;
    secret: string;
    handler: string;
    step: Step;
  }> {
    const handler = `hostile_${++counter}`;
    await stack.registerTemplate({
      namespace: "hostile",
      name: handler,
      version: "1",
      // A lease longer than any test: only what a pool sends can move this attempt.
      steps: [{ name: "only", handler, timeout_ms: 600_000, retry: { max_attempts: 3 } }],
    });
    const victim = peer(`victim-${counter}-${randomBytes(3).toString("hex")}`);
    const secret = session();
    await hello(victim, handler, { session: secret });
    await victim.next("WELCOME");
    victim.startHeartbeat(RAW_HEARTBEAT_MS);
    await stack.broker.submit({ namespace: "hostile", name: handler, context: {} });
    const m = await victim.take("STEP");
    const steps = m.body.steps as Step[];
    assert.equal(steps.length, 1);
    return { victim, secret, handler, step: steps[0]! };
  }

  /** A welcomed, heartbeating pool of its own id that will try to take the victim's work. */
  async function intruder(handler: string, endpoint = stack.endpoint): Promise<RawPeer> {
    const p = peer(`intruder-${++counter}`, endpoint);
    await hello(p, handler, { session: session() });
    await p.next("WELCOME");
    p.startHeartbeat(RAW_HEARTBEAT_MS);
    return p;
  }

  /**
   * Connects with routing id `id` and says HELLO until the broker answers. The ROUTER refuses a
   * connection while it still holds a closed one with the same id (and then takes the next frame
   * it reads as the id), so each try is a fresh socket after a backoff, as the SDKs reconnect.
   */
  async function answeredPeer(
    id: string,
    handler: string,
    opts: { session?: string; running?: string[] },
  ): Promise<{ peer: RawPeer; answer: Incoming }> {
    for (let tries = 0; tries < 20; tries++) {
      await new Promise((r) => setTimeout(r, 200));
      const p = peer(id);
      await hello(p, handler, opts);
      const answer = await p.next(undefined, 500).catch(() => undefined);
      if (answer) return { peer: p, answer };
      p.close();
    }
    throw new Error(`no answer to a HELLO from ${id}`);
  }

  function assertError(m: Incoming, code: ErrorCode, extra: Record<string, unknown> = {}): void {
    assert.equal(m.command, "ERROR", `expected ERROR ${code}, got ${m.command} ${JSON.stringify(m.body)}`);
    assert.equal(m.body.code, code, `ERROR code, in ${JSON.stringify(m.body)}`);
    for (const [k, v] of Object.entries(extra))
      assert.deepEqual(m.body[k], v, `ERROR ${k}, in ${JSON.stringify(m.body)}`);
  }

  /** The broker logged that `pool` was refused `command` for `attemptId`, naming its owner. */
  async function assertRefusalLogged(command: string, pool: string, owner: string, attemptId: string) {
    await eventually(`a log line refusing ${command} from ${pool} for ${owner}'s attempt`, () =>
      logs.some(
        (l) =>
          l.command === command &&
          l.pool_id === pool &&
          l.owner_pool_id === owner &&
          l.attempt_id === attemptId &&
          l.msg.includes(pool) &&
          l.msg.includes(owner),
      )
        ? true
        : undefined,
    );
  }

  /** The victim's own result is stored, and the attempt row names the victim. */
  async function assertVictimResultStored(victim: RawPeer, poolId: string, step: Step): Promise<void> {
    await victim.send("RESULT", {
      results: [{ attempt_id: step.attempt_id, status: "complete", output: { from: poolId } }],
    });
    assert.deepEqual((await victim.take("ACK")).body.acks, [
      { attempt_id: step.attempt_id, outcome: "stored" },
    ]);
    const done = await stack.waitForTask(step.task_id);
    assert.equal(done.state, "complete");
    assert.deepEqual(stepOf(done, "only").output, { from: poolId });
    const attempts = await stack.sm.getAttempts(step.task_id);
    assert.deepEqual(
      attempts.map((a) => [a.attemptId, a.outcome, a.poolId]),
      [[step.attempt_id, "complete", poolId]],
    );
  }

  it("refuses a HELLO whose pool_id is another pool's, sent from another routing id", async () => {
    const { victim, handler, step } = await victimWithAttempt();
    const impostor = peer(`impostor-${counter}`);
    await hello(impostor, handler, { poolId: victim.id, running: [step.attempt_id] });
    assertError(await impostor.next(), "identity_mismatch", { command: "HELLO" });
    await eventually("the identity_mismatch log line", () =>
      logs.some((l) => l.pool_id === victim.id && l.routing_id === impostor.id && l.msg.includes(impostor.id))
        ? true
        : undefined,
    );
    assert.equal(stack.broker.listPools().filter((p) => p.pool_id === victim.id).length, 1);
    await assertVictimResultStored(victim, victim.id, step);
  });

  it("keeps a connected pool's route from a second connection with its routing id", async () => {
    const { victim, handler, step } = await victimWithAttempt();
    // Over tcp the ROUTER refuses the second connection outright: the impostor's HELLO never
    // reaches the broker, so there is no ERROR to read, and no STEP or WELCOME ever reaches it.
    const impostor = peer(victim.id);
    await hello(impostor, handler, { running: [step.attempt_id] });
    await assert.rejects(impostor.next(undefined, 1500), /no answer within/);
    // The route is still the victim's: the next STEP goes to it.
    const { task } = await stack.broker.submit({ namespace: "hostile", name: handler, context: {} });
    const second = (await victim.take("STEP")).body.steps as Step[];
    assert.equal(second[0]!.task_id, task.task_id);
    assert.deepEqual(impostor.received, [], "the impostor received nothing");
    await assertVictimResultStored(victim, victim.id, step);
  });

  it("refuses a HELLO for a dropped pool's routing id without its session secret, and lets the owner adopt", async () => {
    const { victim, secret, handler, step } = await victimWithAttempt();
    victim.close(); // the victim's connection drops; its registration and attempt wait for it
    const impostor = await answeredPeer(victim.id, handler, {
      running: [step.attempt_id],
      session: session(),
    });
    assertError(impostor.answer, "session_mismatch", { command: "HELLO" });
    await hello(impostor.peer, handler, { running: [step.attempt_id] });
    assertError(await impostor.peer.next("ERROR"), "session_mismatch", { command: "HELLO" });
    assert.ok(
      logs.some((l) => l.pool_id === victim.id && /another session/.test(l.msg)),
      "the refusal is logged with the pool id",
    );
    impostor.peer.close();

    // The owner comes back with its secret, adopts its attempt and its result is stored.
    const { peer: back, answer: welcome } = await answeredPeer(victim.id, handler, {
      running: [step.attempt_id],
      session: secret,
    });
    assert.equal(welcome.command, "WELCOME", JSON.stringify(welcome));
    assert.deepEqual(welcome.body.adopted, [step.attempt_id]);
    back.startHeartbeat(RAW_HEARTBEAT_MS);
    await assertVictimResultStored(back, victim.id, step);
  });

  it("refuses, at a broker that never saw the owner, a HELLO that would adopt its attempts without its secret", async () => {
    const { victim, handler, step } = await victimWithAttempt();
    const other = await secondBroker();
    const impostor = peer(victim.id, other.endpoints[0]!);
    await hello(impostor, handler, { running: [step.attempt_id] });
    assertError(await impostor.next(), "session_mismatch", { command: "HELLO" });
    await assertVictimResultStored(victim, victim.id, step);
  });

  it("refuses a hand-back of another pool's attempt", async () => {
    const { victim, handler, step } = await victimWithAttempt();
    const thief = await intruder(handler);
    await thief.send("DISCONNECT", { reason: "leaving", handed_back: [step.attempt_id] });
    assertError(await thief.next(), "not_your_attempt", {
      command: "DISCONNECT",
      attempt_id: step.attempt_id,
    });
    await assertRefusalLogged("DISCONNECT", thief.id, victim.id, step.attempt_id);
    const task = await stack.broker.status(step.task_id);
    assert.equal(stepOf(task!, "only").state, "in_progress", "the hand-back changed nothing");
    await assertVictimResultStored(victim, victim.id, step);
  });

  it("refuses to adopt another pool's attempt in HELLO.running", async () => {
    const { victim, handler, step } = await victimWithAttempt();
    const thief = peer(`intruder-${++counter}`);
    await hello(thief, handler, { session: session(), running: [step.attempt_id] });
    const welcome = await thief.next("WELCOME");
    assert.deepEqual(welcome.body.adopted, []);
    assertError(await thief.next(), "not_your_attempt", { command: "HELLO", attempt_id: step.attempt_id });
    await assertRefusalLogged("HELLO", thief.id, victim.id, step.attempt_id);
    await assertVictimResultStored(victim, victim.id, step);
  });

  it("refuses PROGRESS for another pool's attempt", async () => {
    const { victim, handler, step } = await victimWithAttempt();
    const thief = await intruder(handler);
    await thief.send("PROGRESS", { progress: [{ attempt_id: step.attempt_id, fraction: 0.5 }] });
    assertError(await thief.next(), "not_your_attempt", { command: "PROGRESS", attempt_id: step.attempt_id });
    await assertRefusalLogged("PROGRESS", thief.id, victim.id, step.attempt_id);
    await assertVictimResultStored(victim, victim.id, step);
  });

  it("refuses a RESULT for another pool's attempt, held here or known only to the database", async () => {
    const { victim, handler, step } = await victimWithAttempt();
    const thief = await intruder(handler);
    await thief.send("RESULT", {
      results: [{ attempt_id: step.attempt_id, status: "complete", output: { from: "thief" } }],
    });
    assert.deepEqual((await thief.next("ACK")).body.acks, [
      { attempt_id: step.attempt_id, outcome: "stale" },
    ]);
    assertError(await thief.next(), "not_your_attempt", { command: "RESULT", attempt_id: step.attempt_id });
    await assertRefusalLogged("RESULT", thief.id, victim.id, step.attempt_id);

    // At another broker the attempt is in nobody's memory: the database names its owner.
    const other = await secondBroker();
    const remote = await intruder(handler, other.endpoints[0]!);
    await remote.send("RESULT", {
      results: [{ attempt_id: step.attempt_id, status: "complete", output: { from: "remote thief" } }],
    });
    assert.deepEqual((await remote.next("ACK")).body.acks, [
      { attempt_id: step.attempt_id, outcome: "stale" },
    ]);
    assertError(await remote.next(), "not_your_attempt", { command: "RESULT", attempt_id: step.attempt_id });
    await assertRefusalLogged("RESULT", remote.id, victim.id, step.attempt_id);
    const task = await stack.broker.status(step.task_id);
    assert.equal(stepOf(task!, "only").state, "in_progress", "neither thief changed the step");
    await assertVictimResultStored(victim, victim.id, step);
  });

  it("keeps a step lost at an unproven pool from the next unproven pool while a proven pool serves its handler", async function () {
    this.timeout(30_000);
    const handler = `hostile_${++counter}`;
    await stack.registerTemplate({
      namespace: "hostile",
      name: handler,
      version: "1",
      // Two attempts: a retry spent at a second unproven pool would fail the task.
      steps: [
        {
          name: "only",
          handler,
          timeout_ms: 600_000,
          retry: { max_attempts: 2, backoff: { initial_ms: 10 } },
        },
      ],
    });
    const submit = async (n: number) =>
      (await stack.broker.submit({ namespace: "hostile", name: handler, context: { n } })).task.task_id;
    const stepIn = (m: Incoming) => (m.body.steps as Step[])[0]!;

    // A proven pool (it has had a result stored) of one slot, then busy with a step it sits on.
    const proven = peer(`proven-${counter}-${randomBytes(3).toString("hex")}`);
    await proven.hello([handler], { capacity: 1, heartbeatMs: RAW_HEARTBEAT_MS });
    await submit(0);
    const warm = stepIn(await proven.take("STEP"));
    await proven.send("RESULT", {
      results: [{ attempt_id: warm.attempt_id, status: "complete", output: {} }],
    });
    await proven.take("ACK");
    await submit(1);
    const busy = stepIn(await proven.take("STEP"));

    // A silent unproven pool takes the next step as its probe and is purged for its silence.
    const silentPool = peer(`silent-${counter}-${randomBytes(3).toString("hex")}`);
    await silentPool.hello([handler], { capacity: 4 });
    const taskId = await submit(2);
    const probe = stepIn(await silentPool.take("STEP"));
    assert.equal(probe.task_id, taskId);
    // A second unproven pool, alive, with credit for a probe when the step comes back.
    const second = peer(`unproven-${counter}-${randomBytes(3).toString("hex")}`);
    await second.hello([handler], { capacity: 4, heartbeatMs: RAW_HEARTBEAT_MS });
    await eventually(
      "the silent pool purged",
      () => (stack.broker.listPools().some((p) => p.pool_id === silentPool.id) ? undefined : true),
      15_000,
    );
    // Dispatch rounds (each kick, and the poll) go by while the step is ready again.
    await new Promise((r) => setTimeout(r, 1000));
    assert.equal(
      stack.broker.listPools().find((p) => p.pool_id === second.id)?.in_flight,
      0,
      "the second unproven pool was not given the step lost at the first",
    );
    assert.equal(
      await second.take("STEP", 50).then(
        () => true,
        () => false,
      ),
      false,
      "nor did it receive a STEP",
    );

    // Once the proven pool is free again it runs the retry.
    await proven.send("RESULT", {
      results: [{ attempt_id: busy.attempt_id, status: "complete", output: {} }],
    });
    await proven.take("ACK");
    const retry = stepIn(await proven.take("STEP", 10_000));
    assert.equal(retry.task_id, taskId);
    await proven.send("RESULT", {
      results: [{ attempt_id: retry.attempt_id, status: "complete", output: {} }],
    });
    assert.equal((await stack.waitForTask(taskId)).state, "complete");
    const attempts = await stack.sm.getAttempts(taskId);
    assert.deepEqual(
      attempts.map((a) => [a.outcome, a.poolId]),
      [
        ["lost", silentPool.id],
        ["complete", proven.id],
      ],
    );
  });

  describe("a swarm of silent pools", () => {
    const SILENT = 2000;
    const TASKS = 300;
    const sockets: Dealer[] = [];
    // A context of their own: the default one allows 1,023 sockets.
    let context: Context | undefined;
    after(() => {
      for (const s of sockets) s.close();
    });

    it(`lets a working pool complete every task while ${SILENT} silent pools of capacity 10,000 arrive`, async function () {
      // About 15 s on a quiet machine; at a load average of 12 connecting the swarm alone took 95 s.
      this.timeout(240_000);
      await stack.registerTemplate({
        namespace: "hostile",
        name: "swarm",
        version: "1",
        steps: [{ name: "only", handler: "swarm", retry: { max_attempts: 3, backoff: { initial_ms: 10 } } }],
      });
      const submit = async (n: number) =>
        (await stack.broker.submit({ namespace: "hostile", name: "swarm", context: { n } })).task.task_id;

      // The honest pool is at work (it has completed a task) when the swarm arrives.
      const honest = new HandlerPool({
        endpoint: stack.endpoint,
        poolId: `honest-${randomBytes(3).toString("hex")}`,
        capacity: 128,
        logger: silent,
      });
      honest.handle("swarm", (step) => ({ n: step.context.n }));
      await honest.start();
      cleanups.push(() => honest.close({ drainMs: 1000 }));
      assert.equal((await stack.waitForTask(await submit(-1))).state, "complete");

      // Each silent pool says HELLO and then nothing at all: it takes what it is given and never
      // answers, until it is purged for missed heartbeats. Tasks arrive while the swarm does. While the working pool has credit, no silent pool is offered work;
      // when it has none, silent pools hold at most their probes (PROTOCOL.md, Credit), and each
      // probe lost counts as an attempt: that residue is what the bounds below check.
      context = new Context({ maxSockets: SILENT + 64 });
      const ids: string[] = [];
      const sending: Promise<void>[] = [];
      let mostAtOne = 0;
      let mostInAll = 0;
      const started = Date.now();
      for (let i = 0; i < SILENT; i++) {
        const id = `silent-${i}-${randomBytes(3).toString("hex")}`;
        const s = new Dealer({
          context,
          routingId: id,
          linger: 0,
          // The HELLO goes only on a connection the broker accepted: libzmq's listening socket
          // queues 100 connections, and past that a loaded broker that accepts more slowly than
          // they come loses some, with the HELLO already written to them, which a silent pool,
          // unlike a real one, never sends again. The send waits for the broker instead.
          immediate: true,
          sendTimeout: 60_000,
          receiveHighWaterMark: 10,
        });
        sockets.push(s);
        s.connect(stack.endpoint);
        sending.push(
          s.send(
            encodeMessage("HELLO", {
              pool_id: id,
              handlers: ["swarm"],
              capacity: 10_000,
              sdk: { language: "node", name: "silent-test-peer", version: "0" },
            }),
          ),
        );
        // Fifty connections at a time: fewer than the listening socket queues.
        if (i % 50 === 49) await Promise.all(sending.splice(0));
        // Once 100 silent pools wait, more at once than the working pool can hold: the rest
        // waits, and probes may take some.
        if (i === 100)
          ids.push(
            ...(await Promise.all(Array.from({ length: (TASKS * 2) / 3 }, (_, n) => submit(ids.length + n)))),
          );
        if (i % 10 === 0 && ids.length < TASKS) ids.push(await submit(ids.length));
        if (i % 50 === 0) {
          const held = stack.broker
            .listPools()
            .filter((p) => p.pool_id.startsWith("silent-"))
            .map((p) => p.in_flight);
          mostAtOne = Math.max(mostAtOne, ...held);
          mostInAll = Math.max(
            mostInAll,
            held.reduce((a, b) => a + b, 0),
          );
        }
      }
      while (ids.length < TASKS) ids.push(await submit(ids.length));
      // Counted in the log: the first ones are purged (missed heartbeats) before the last arrive.
      await eventually(
        `${SILENT} silent pools welcomed`,
        () =>
          logs.filter((l) => l.pool_id?.startsWith("silent-") && / connected: /.test(l.msg)).length >= SILENT
            ? true
            : undefined,
        30_000,
      );
      const swarmMs = Date.now() - started;

      for (const id of ids) {
        const done = await stack.waitForTask(id, 60_000);
        assert.equal(done.state, "complete", `task ${id}: ${JSON.stringify(done.error ?? done.steps)}`);
      }
      assert.ok(mostAtOne <= 1, `a silent pool held ${mostAtOne} attempts beside a working pool`);
      assert.ok(mostInAll <= PROBE_BUDGET, `silent pools held ${mostInAll} attempts in all`);
      process.stdout.write(
        `      (${SILENT} silent pools welcomed in ${swarmMs} ms; at most ${mostInAll} attempts parked at them at once)\n`,
      );
    });
  });
});
