/**
 * Nothing lost, nothing crashes: a real broker on a real PostgreSQL receives,
 * from raw ZeroMQ DEALERs, every kind of bad input the protocol names. Each
 * test checks the broker's answer (an ERROR with the stable code, or an ACK
 * outcome) and that a well-behaved pool, connected before the bad input
 * arrived, still gets a task done afterwards.
 */
import { strict as assert } from "node:assert";
import { randomUUID } from "node:crypto";
import { pino } from "pino";
import { HandlerPool } from "../../handlers-node";
import { HARD_LIMIT_FACTOR, MAX_CONSECUTIVE_ERRORS, SIGNATURE, type ErrorCode } from "../../protocol";
import { RawPeer, type Incoming } from "../support/rawPeer";
import { eventually, silent, stepOf, useBrokerStack, type Transport } from "../support/stack";

/** Small, so oversized bodies stay cheap to build; libzmq cuts off at 16 times this. */
const MAX_BYTES = 4096;
/**
 * The broker's liveness here, stated rather than inherited: a pool is dead, and
 * a dropped peer ignored, for HEARTBEAT_MS × HEARTBEAT_LIVENESS.
 */
const HEARTBEAT_MS = 200;
const HEARTBEAT_LIVENESS = 3;
/** Raw pools that must stay registered heartbeat well inside that. */
const RAW_HEARTBEAT_MS = 40;

const ECHO = {
  namespace: "bad",
  name: "echo",
  version: "1",
  steps: [{ name: "only", handler: "echo" }],
};

const HELLO_BODY = {
  pool_id: "p",
  handlers: ["h"],
  capacity: 1,
  sdk: { language: "node", name: "raw-test-peer", version: "0" },
};

type LogLine = { level: number; msg: string; code?: string; peer?: string; pool_id?: string };

interface FrameCase {
  title: string;
  frames: (string | Buffer)[];
  code: ErrorCode;
  command?: string;
  schemaPath?: string;
  instancePath?: string;
}

/** Bad messages that any peer, registered or not, gets one ERROR for. */
const FRAME_CASES: FrameCase[] = [
  { title: "a message of one frame", frames: [SIGNATURE], code: "malformed_frame" },
  { title: "a message of two frames", frames: [SIGNATURE, "HEARTBEAT"], code: "malformed_frame" },
  {
    title: "a message of four frames (an empty delimiter in front, as REQ sends)",
    frames: ["", SIGNATURE, "HEARTBEAT", "{}"],
    code: "malformed_frame",
  },
  {
    title: "a signature of another protocol version (stepbroker/2)",
    frames: ["stepbroker/2", "HEARTBEAT", "{}"],
    code: "unsupported_version",
  },
  {
    title: "a signature that is not this protocol's (hello)",
    frames: ["hello", "HEARTBEAT", "{}"],
    code: "malformed_frame",
  },
  { title: "an unknown command (FROB)", frames: [SIGNATURE, "FROB", "{}"], code: "unknown_command" },
  {
    title: "a broker-to-pool command sent to the broker (STEP)",
    frames: [SIGNATURE, "STEP", '{"steps":[]}'],
    code: "unknown_command",
  },
  {
    title: "a broker-to-pool command sent to the broker (WELCOME)",
    frames: [SIGNATURE, "WELCOME", "{}"],
    code: "unknown_command",
  },
  {
    title: "a body that is neither JSON nor MessagePack",
    frames: [SIGNATURE, "HELLO", "pool_id=p handlers=h"],
    code: "undecodable_body",
    command: "HELLO",
  },
  {
    title: "a truncated JSON body",
    frames: [SIGNATURE, "HELLO", '{"pool_id": "p", "handlers": ['],
    code: "undecodable_body",
    command: "HELLO",
  },
  {
    title: "a truncated MessagePack body (a map of one entry with its key but no value)",
    frames: [SIGNATURE, "HELLO", Buffer.from([0x81, 0xa1, 0x61])],
    code: "undecodable_body",
    command: "HELLO",
  },
  {
    title: "a JSON body that is not valid UTF-8",
    frames: [
      SIGNATURE,
      "HELLO",
      Buffer.concat([
        Buffer.from('{"pool_id": "p'),
        Buffer.from([0xff, 0xfe]),
        Buffer.from(JSON.stringify(HELLO_BODY).replace(/^\{"pool_id":"p"/, '"')),
      ]),
    ],
    code: "undecodable_body",
    command: "HELLO",
  },
  {
    title: "a HELLO with a misspelt field",
    frames: [SIGNATURE, "HELLO", JSON.stringify({ ...HELLO_BODY, lables: { team: "x" } })],
    code: "schema_violation",
    command: "HELLO",
    schemaPath: "#/additionalProperties",
    instancePath: "",
  },
  {
    title: "a HELLO naming no handlers",
    frames: [SIGNATURE, "HELLO", JSON.stringify({ ...HELLO_BODY, handlers: [] })],
    code: "schema_violation",
    command: "HELLO",
    schemaPath: "#/properties/handlers/minItems",
    instancePath: "/handlers",
  },
  {
    title: `a body over max_message_bytes (${MAX_BYTES})`,
    frames: [SIGNATURE, "HELLO", JSON.stringify({ ...HELLO_BODY, labels: { pad: "x".repeat(MAX_BYTES) } })],
    code: "message_too_large",
    command: "HELLO",
  },
  {
    title: "a RESULT before HELLO",
    frames: [
      SIGNATURE,
      "RESULT",
      JSON.stringify({ results: [{ attempt_id: randomUUID(), status: "complete", output: 1 }] }),
    ],
    code: "hello_required",
    command: "RESULT",
  },
  {
    title: "a PROGRESS before HELLO",
    frames: [SIGNATURE, "PROGRESS", JSON.stringify({ progress: [{ attempt_id: randomUUID() }] })],
    code: "hello_required",
    command: "PROGRESS",
  },
  {
    title: "a HEARTBEAT before HELLO",
    frames: [SIGNATURE, "HEARTBEAT", "{}"],
    code: "hello_required",
    command: "HEARTBEAT",
  },
];

for (const transport of ["tcp", "inproc"] as Transport[]) {
  describe(`the broker under bad input over ${transport}://`, function () {
    this.timeout(30_000);
    const logs: LogLine[] = [];
    const logger = pino(
      { level: "info" },
      { write: (line: string) => void logs.push(JSON.parse(line) as LogLine) },
    );
    const stack = useBrokerStack(`bad_input_${transport}`, transport, {
      maxMessageBytes: MAX_BYTES,
      heartbeatMs: HEARTBEAT_MS,
      heartbeatLiveness: HEARTBEAT_LIVENESS,
      logger,
    });
    const cleanups: (() => Promise<void> | void)[] = [];
    let counter = 0;

    before(async () => {
      await stack.registerTemplate(ECHO);
    });
    afterEach(async () => {
      while (cleanups.length) await cleanups.pop()!();
    });

    function peer(id?: string): RawPeer {
      const p = RawPeer.connect(stack.endpoint, id);
      cleanups.push(() => p.close());
      return p;
    }

    /** A raw pool, welcomed and heartbeating, serving a handler nobody else serves. */
    async function rawPool(): Promise<{ pool: RawPeer; handler: string; submit(): Promise<string> }> {
      const handler = `raw_${++counter}`;
      await stack.registerTemplate({
        namespace: "bad",
        name: handler,
        version: "1",
        steps: [{ name: "only", handler, retry: { max_attempts: 3 } }],
      });
      const pool = peer();
      await pool.hello([handler], { heartbeatMs: RAW_HEARTBEAT_MS });
      return {
        pool,
        handler,
        submit: async () =>
          (await stack.broker.submit({ namespace: "bad", name: handler, context: {} })).task.task_id,
      };
    }

    /**
     * A well-behaved in-process pool, welcomed before the bad input arrives;
     * `runTask()` later proves the broker still serves it.
     */
    async function goodPool(handler = "echo"): Promise<{ runTask(): Promise<void> }> {
      const p = new HandlerPool({
        endpoint: stack.endpoint,
        poolId: `good-${transport}-${++counter}`,
        capacity: 2,
        logger: silent,
      });
      p.handle(handler, async (step) => ({ handler, context: step.context }));
      await p.start();
      cleanups.push(() => p.close({ drainMs: 1000 }));
      return {
        async runTask() {
          const { task } = await stack.broker.submit({
            namespace: "bad",
            name: "echo",
            context: { after: "bad input" },
          });
          const done = await stack.waitForTask(task.task_id);
          assert.equal(done.state, "complete", "the well-behaved pool completed its task");
          assert.deepEqual(stepOf(done, "only").output, { handler, context: { after: "bad input" } });
        },
      };
    }

    function assertError(
      m: Incoming,
      code: ErrorCode,
      extra: Record<string, unknown> = {},
    ): Record<string, unknown> {
      assert.equal(m.command, "ERROR", `expected ERROR ${code}, got ${m.command} ${JSON.stringify(m.body)}`);
      assert.equal(m.body.code, code, `ERROR code, in ${JSON.stringify(m.body)}`);
      assert.equal(typeof m.body.message, "string");
      for (const [k, v] of Object.entries(extra))
        assert.deepEqual(m.body[k], v, `ERROR ${k}, in ${JSON.stringify(m.body)}`);
      return m.body;
    }

    /** The one step of a STEP message, as the raw pool received it. */
    function firstStep(m: Incoming): {
      attempt_id: string;
      task_id: string;
      step_id: string;
      attempt: number;
    } {
      assert.equal(m.command, "STEP");
      const steps = m.body.steps as {
        attempt_id: string;
        task_id: string;
        step_id: string;
        attempt: number;
      }[];
      assert.equal(steps.length, 1);
      return steps[0]!;
    }

    function result(attemptId: string, output: unknown) {
      return { results: [{ attempt_id: attemptId, status: "complete" as const, output: output as null }] };
    }

    // ------------------------------------------------------------ one bad message, one ERROR

    for (const c of FRAME_CASES) {
      it(`answers ${c.title} with ${c.code} and keeps serving`, async () => {
        const good = await goodPool();
        const raw = peer();
        await raw.sendFrames(c.frames);
        const extra: Record<string, unknown> = {};
        if (c.command !== undefined) extra.command = c.command;
        if (c.schemaPath !== undefined) extra.schema_path = c.schemaPath;
        if (c.instancePath !== undefined) extra.instance_path = c.instancePath;
        assertError(await raw.next(), c.code, extra);
        // The peer was not registered by whatever it sent.
        assert.ok(!stack.broker.listPools().some((p) => p.pool_id === raw.id || p.pool_id === "p"));
        await good.runTask();
      });
    }

    it("answers a RESULT that completes without output with schema_violation, and the pool stays registered", async () => {
      const good = await goodPool();
      const { pool } = await rawPool();
      await pool.sendJson("RESULT", { results: [{ attempt_id: randomUUID(), status: "complete" }] });
      assertError(await pool.next(), "schema_violation", {
        command: "RESULT",
        instance_path: "/results/0",
        schema_path: "#/properties/results/items/allOf/0/then/required",
      });
      assert.ok(
        stack.broker.listPools().some((p) => p.pool_id === pool.id),
        "one bad message does not drop a pool",
      );
      await good.runTask();
    });

    it("stores the valid results of a RESULT with an invalid item, and refuses that item by its attempt_id", async () => {
      const good = await goodPool();
      const { pool, submit } = await rawPool();
      const taskId = await submit();
      const step = firstStep(await pool.next("STEP"));
      const badId = randomUUID();
      await pool.sendJson("RESULT", {
        results: [
          { attempt_id: badId, status: "finished" },
          { attempt_id: step.attempt_id, status: "complete", output: { ok: true } },
        ],
      });
      const error = assertError(await pool.next("ERROR"), "schema_violation", {
        command: "RESULT",
        attempt_id: badId,
        instance_path: "/results/0/status",
      });
      assert.match(String(error.message), /\/results\/0\/status/);
      assert.deepEqual((await pool.next("ACK")).body.acks, [
        { attempt_id: step.attempt_id, outcome: "stored" },
      ]);
      const done = await stack.waitForTask(taskId);
      assert.equal(done.state, "complete");
      assert.deepEqual(stepOf(done, "only").output, { ok: true });
      await good.runTask();
    });

    it(`survives a body over ${HARD_LIMIT_FACTOR} times max_message_bytes and serves its sender again`, async () => {
      const good = await goodPool();
      const raw = peer();
      const huge = JSON.stringify({
        ...HELLO_BODY,
        labels: { pad: "x".repeat(MAX_BYTES * HARD_LIMIT_FACTOR + 1) },
      });
      await raw.sendFrames([SIGNATURE, "HELLO", huge]);
      if (transport === "inproc") {
        // inproc has no wire decoder, so libzmq's size limit never applies: the broker answers.
        assertError(await raw.next(), "message_too_large", { command: "HELLO" });
      }
      // Over tcp libzmq drops the connection without an answer and the DEALER
      // reconnects by itself; a request sent after that is answered.
      const answered = await eventually(
        "an answer to the sender of the oversized message",
        async () => {
          await raw.probe();
          return await raw.next(undefined, 500).catch(() => undefined);
        },
        15_000,
      );
      assert.equal(
        answered.command,
        "REPLY",
        `first answer after the oversized body: ${JSON.stringify(answered)}`,
      );
      const other = peer();
      const requestId = await other.probe();
      assert.equal((await other.next("REPLY")).body.request_id, requestId);
      await good.runTask();
    });

    // ------------------------------------------------------------ results that cannot be stored

    it("acknowledges a result for an attempt that does not exist as unknown", async () => {
      const good = await goodPool();
      const { pool } = await rawPool();
      const attemptId = randomUUID();
      await pool.send("RESULT", result(attemptId, { made: "up" }));
      const ack = await pool.next("ACK");
      assert.deepEqual(ack.body.acks, [{ attempt_id: attemptId, outcome: "unknown" }]);
      await good.runTask();
    });

    it("refuses as stale a result for an attempt another pool holds, and stores the holder's result", async () => {
      const good = await goodPool();
      const holder = await rawPool();
      const intruder = await rawPool();
      const taskId = await holder.submit();
      const step = firstStep(await holder.pool.next("STEP"));

      await intruder.pool.send("RESULT", result(step.attempt_id, { from: "intruder" }));
      assert.deepEqual((await intruder.pool.next("ACK")).body.acks, [
        { attempt_id: step.attempt_id, outcome: "stale" },
      ]);
      const stillHeld = await stack.broker.status(taskId);
      assert.equal(stepOf(stillHeld!, "only").state, "in_progress", "the intruder changed nothing");

      await holder.pool.send("RESULT", result(step.attempt_id, { from: "holder" }));
      assert.deepEqual((await holder.pool.next("ACK")).body.acks, [
        { attempt_id: step.attempt_id, outcome: "stored" },
      ]);
      const done = await stack.waitForTask(taskId);
      assert.equal(done.state, "complete");
      assert.deepEqual(stepOf(done, "only").output, { from: "holder" });
      const attempts = await stack.sm.getAttempts(taskId);
      assert.deepEqual(
        attempts.map((a) => [a.attemptId, a.outcome, a.poolId]),
        [[step.attempt_id, "complete", holder.pool.id]],
      );
      await good.runTask();
    });

    it("refuses as stale a result sent after the attempt's lease was released", async () => {
      const good = await goodPool();
      const { pool, submit } = await rawPool();
      const taskId = await submit();
      const first = firstStep(await pool.next("STEP"));
      const released = await stack.sm.releaseAttempts([first.attempt_id], {
        countAttempt: true,
        reason: "test moved the lease",
      });
      assert.equal(released.attempts.length, 1);

      await pool.send("RESULT", result(first.attempt_id, { from: "first" }));
      assert.deepEqual((await pool.take("ACK")).body.acks, [
        { attempt_id: first.attempt_id, outcome: "stale" },
      ]);
      // Its credit came back, so the step comes again as a new attempt, which completes it.
      const second = firstStep(await pool.take("STEP"));
      assert.notEqual(second.attempt_id, first.attempt_id);
      assert.equal(second.attempt, 2);
      await pool.send("RESULT", result(second.attempt_id, { from: "second" }));
      assert.deepEqual((await pool.take("ACK")).body.acks, [
        { attempt_id: second.attempt_id, outcome: "stored" },
      ]);
      const done = await stack.waitForTask(taskId);
      assert.deepEqual(stepOf(done, "only").output, { from: "second" });
      const outcomes = (await stack.sm.getAttempts(taskId)).map((a) => a.outcome);
      assert.deepEqual(outcomes, ["lost", "complete"]);
      await good.runTask();
    });

    it("refuses as stale the result of a pool that went silent, was purged and came back", async () => {
      const good = await goodPool();
      const { pool, handler, submit } = await rawPool();
      const taskId = await submit();
      const first = firstStep(await pool.next("STEP"));
      pool.stopHeartbeat();
      await eventually("the silent pool to be purged", () =>
        stack.broker.listPools().some((p) => p.pool_id === pool.id) ? undefined : true,
      );
      // Back, without the attempt in `running`: the broker gives it the step again as attempt 2.
      await pool.hello([handler], { heartbeatMs: RAW_HEARTBEAT_MS });
      const second = firstStep(await pool.take("STEP"));
      assert.equal(second.attempt, 2);
      await pool.send("RESULT", result(first.attempt_id, { from: "first" }));
      assert.deepEqual((await pool.take("ACK")).body.acks, [
        { attempt_id: first.attempt_id, outcome: "stale" },
      ]);
      await pool.send("RESULT", result(second.attempt_id, { from: "second" }));
      assert.deepEqual((await pool.take("ACK")).body.acks, [
        { attempt_id: second.attempt_id, outcome: "stored" },
      ]);
      const done = await stack.waitForTask(taskId);
      assert.deepEqual(stepOf(done, "only").output, { from: "second" });
      await good.runTask();
    });

    it("acknowledges a second result for the same attempt as duplicate and stores exactly one", async () => {
      const good = await goodPool();
      const { pool, submit } = await rawPool();
      const taskId = await submit();
      const step = firstStep(await pool.next("STEP"));
      await pool.send("RESULT", result(step.attempt_id, { copy: 1 }));
      assert.deepEqual((await pool.next("ACK")).body.acks, [
        { attempt_id: step.attempt_id, outcome: "stored" },
      ]);
      await pool.send("RESULT", result(step.attempt_id, { copy: 2 }));
      assert.deepEqual((await pool.next("ACK")).body.acks, [
        { attempt_id: step.attempt_id, outcome: "duplicate" },
      ]);
      const done = await stack.waitForTask(taskId);
      assert.deepEqual(stepOf(done, "only").output, { copy: 1 }, "the first result stands");
      const attempts = await stack.sm.getAttempts(taskId);
      assert.deepEqual(
        attempts.map((a) => [a.attemptId, a.outcome]),
        [[step.attempt_id, "complete"]],
      );
      await good.runTask();
    });

    // ------------------------------------------------------------ errors from peers, and peers that keep erring

    it("logs an ERROR it receives and never answers it with an ERROR, even a malformed one", async () => {
      const good = await goodPool();
      const raw = peer();
      await raw.send("ERROR", { code: "internal_error", message: "the pool is confused", command: "STEP" });
      await raw.sendJson("ERROR", { code: "internal_error" }); // no message: fails its schema
      await raw.sendFrames([SIGNATURE, "ERROR", "not a body"]); // undecodable
      const requestId = await raw.probe();
      const first = await raw.next();
      assert.equal(
        first.command,
        "REPLY",
        `the first answer is to the probe, not to an ERROR: ${JSON.stringify(first)}`,
      );
      assert.equal(first.body.request_id, requestId);
      assert.ok(
        logs.some(
          (l) => l.code === "internal_error" && l.peer === raw.id && /the pool is confused/.test(l.msg),
        ),
        "the received ERROR is logged",
      );
      await good.runTask();
    });

    it(`disconnects a pool after ${MAX_CONSECUTIVE_ERRORS} bad messages in a row, runs its steps elsewhere and ignores it for a while`, async () => {
      const good = await goodPool();
      const { pool, handler, submit } = await rawPool();
      const taskId = await submit();
      const step = firstStep(await pool.next("STEP"));
      // Its heartbeats are good messages, which would reset the count of bad ones.
      pool.stopHeartbeat();
      for (let i = 0; i < MAX_CONSECUTIVE_ERRORS; i++) await pool.sendFrames([SIGNATURE, "HEARTBEAT"]);
      for (let i = 0; i < MAX_CONSECUTIVE_ERRORS; i++) assertError(await pool.next(), "malformed_frame");
      const bye = await pool.next("DISCONNECT");
      assert.equal(bye.body.code, "too_many_errors");
      // Ignored for now: a request sent straight away is never answered.
      const ignoredRequest = await pool.probe();
      assert.ok(!stack.broker.listPools().some((p) => p.pool_id === pool.id), "its registration is dropped");

      // Its in-flight step went back to ready and runs on another pool.
      const rescuer = new HandlerPool({
        endpoint: stack.endpoint,
        poolId: `rescuer-${transport}-${++counter}`,
        logger: silent,
      });
      rescuer.handle(handler, async () => ({ rescued: true }));
      await rescuer.start();
      cleanups.push(() => rescuer.close({ drainMs: 1000 }));
      const done = await stack.waitForTask(taskId);
      assert.equal(done.state, "complete");
      assert.deepEqual(stepOf(done, "only").output, { rescued: true });
      const attempts = await stack.sm.getAttempts(taskId);
      assert.deepEqual(
        attempts.map((a) => [a.attemptId === step.attempt_id, a.outcome]),
        [
          [true, "lost"],
          [false, "complete"],
        ],
      );
      await good.runTask();

      // Once the while is over it is served again, as a stranger: it must HELLO.
      const answer = await eventually(
        "the dropped peer to be heard again",
        async () => {
          await pool.sendFrames([SIGNATURE, "HEARTBEAT", "{}"]);
          return await pool.next(undefined, 300).catch(() => undefined);
        },
        15_000,
      );
      assertError(answer, "hello_required", { command: "HEARTBEAT" });
      assert.ok(
        !pool.received.some((m) => m.command === "REPLY" && m.body.request_id === ignoredRequest),
        "the request sent while ignored was never answered",
      );
      await pool.hello([handler]);
    });

    it("counts only bad messages in a row: a good one in between starts the count again", async () => {
      const good = await goodPool();
      const { pool } = await rawPool();
      pool.stopHeartbeat();
      const bad = MAX_CONSECUTIVE_ERRORS - 1;
      for (let i = 0; i < bad; i++) await pool.sendFrames([SIGNATURE, "HEARTBEAT"]);
      await pool.send("HEARTBEAT", {});
      for (let i = 0; i < bad; i++) await pool.sendFrames([SIGNATURE, "HEARTBEAT"]);
      const requestId = await pool.probe();
      for (let i = 0; i < 2 * bad; i++) assertError(await pool.next(), "malformed_frame");
      const reply = await pool.next();
      assert.equal(reply.command, "REPLY", `no DISCONNECT: ${JSON.stringify(reply)}`);
      assert.equal(reply.body.request_id, requestId);
      assert.ok(
        stack.broker.listPools().some((p) => p.pool_id === pool.id),
        "still registered",
      );
      await good.runTask();
    });

    // ------------------------------------------------------------ clients

    for (const command of ["STATUS", "WAIT", "CANCEL_TASK"] as const) {
      it(`answers ${command} of a task that does not exist with unknown_task and the request_id`, async () => {
        const good = await goodPool();
        const client = peer();
        const requestId = randomUUID();
        const taskId = randomUUID();
        if (command === "WAIT")
          await client.send("WAIT", { request_id: requestId, task_id: taskId, timeout_ms: 1000 });
        else await client.send(command, { request_id: requestId, task_id: taskId });
        assertError(await client.next(), "unknown_task", { request_id: requestId, command });
        await good.runTask();
      });
    }

    it("answers a client request that fails its schema with schema_violation and the request_id", async () => {
      const good = await goodPool();
      const client = peer();
      const requestId = randomUUID();
      await client.sendJson("SUBMIT", {
        request_id: requestId,
        template: { namespace: "bad", name: "echo" },
        context: {},
        priority: 5000,
      });
      assertError(await client.next(), "schema_violation", {
        request_id: requestId,
        command: "SUBMIT",
        instance_path: "/priority",
        schema_path: "#/properties/priority/maximum",
      });
      await good.runTask();
    });

    it("answers SUBMIT of a template that is not registered with unknown_template and the request_id", async () => {
      const good = await goodPool();
      const client = peer();
      const requestId = randomUUID();
      await client.send("SUBMIT", {
        request_id: requestId,
        template: { namespace: "bad", name: "no_such_template" },
        context: {},
      });
      assertError(await client.next(), "unknown_template", { request_id: requestId, command: "SUBMIT" });
      await good.runTask();
    });
  });
}
