/**
 * The Ruby handler SDK against a broker that is killed (SIGKILL) while a Ruby
 * pool runs a step, and started again with the same broker id on the same
 * endpoint: the pool reconnects, says in its HELLO that it still holds the
 * attempt, and resends the result it kept; the broker adopts the attempt and
 * stores the result once.
 *
 * Needs Ruby with ffi-rzmq and msgpack (`scripts/setup-ruby.sh` installs them
 * as root on Debian/Ubuntu). Without them the file is skipped, except in CI
 * (process.env.CI set), where it fails.
 */
import { strict as assert } from "node:assert";
import { spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { join } from "node:path";
import type { TaskView } from "../../protocol";
import { freeTcpEndpoint, spawnBrokerProcess, type BrokerProcess } from "../support/brokerProcess";
import { useStateManager } from "../support/db";
import { eventually, spawnPool, stepOf, type ChildPool } from "../support/stack";

const ROOT = join(import.meta.dirname, "..", "..");
const TESTPOOL = join(ROOT, "handlers-ruby", "bin", "stepbroker-testpool");

describe("a Ruby pool across a broker restart (broker in a child process, tcp://127.0.0.1)", function () {
  this.timeout(90_000);
  const state = useStateManager("ruby_reconnect");
  const pools: ChildPool[] = [];
  const brokers: BrokerProcess[] = [];

  before(function () {
    this.timeout(300_000);
    const setup = spawnSync("sh", [join(ROOT, "scripts", "setup-ruby.sh")], {
      encoding: "utf8",
      timeout: 280_000,
    });
    if (setup.status === 0) return;
    const why =
      `Ruby with ffi-rzmq and msgpack is not available (scripts/setup-ruby.sh exited ${setup.status ?? setup.signal}): ` +
      `install them with "sudo apt-get install -y ruby ruby-ffi-rzmq ruby-msgpack" (or run scripts/setup-ruby.sh as root).\n` +
      `${setup.stderr ?? ""}`;
    if (process.env.CI) throw new Error(why);
    process.stderr.write(`skipping the Ruby reconnect tests: ${why}\n`);
    this.skip();
  });

  /** Logs of this test's brokers and pool, printed when it fails. */
  let logs: [string, () => string][] = [];
  afterEach(async function () {
    this.timeout(30_000);
    if (this.currentTest?.state === "failed") {
      for (const [who, text] of logs) process.stderr.write(`\n--- ${who} ---\n${text()}\n`);
    }
    logs = [];
    // Pools first, while a broker can still take their goodbyes.
    while (pools.length) await pools.pop()!.stop();
    while (brokers.length) await brokers.pop()!.stop();
  });

  async function broker(endpoint: string, brokerId: string): Promise<BrokerProcess> {
    // A grace long enough for the Ruby pool's reconnect backoff (up to 5 s) to bring its HELLO first.
    const b = await spawnBrokerProcess({
      endpoint,
      schema: state.schema,
      brokerId,
      recoveryGraceMs: 10_000,
      env: { STEPBROKER_LOG_LEVEL: "info" },
    });
    brokers.push(b);
    logs.push([`broker ${brokers.length}`, () => b.stderr()]);
    return b;
  }

  it("resends its unacknowledged result to the restarted broker, which adopts the attempt and stores it once", async () => {
    await state.sm.registerTemplate({
      namespace: "ruby_faults",
      name: "restart",
      version: "1",
      steps: [{ name: "work", handler: "sleep", config: { ms: 1000 }, timeout_ms: 60_000 }],
    });
    const endpoint = await freeTcpEndpoint();
    const brokerId = `ruby-restart-${randomBytes(3).toString("hex")}`;
    const first = await broker(endpoint, brokerId);
    const pool = await spawnPool("ruby", [
      TESTPOOL,
      "--endpoint",
      endpoint,
      "--handlers",
      "sleep",
      "--capacity",
      "1",
      "--pool-id",
      `rb-${randomBytes(3).toString("hex")}`,
      "--drain-timeout",
      "1",
      // debug: the pool logs each step it starts and finishes, with its attempt_id
      "--log-level",
      "debug",
    ]);
    pools.push(pool);
    let log = "";
    pool.child.stderr!.on("data", (d: Buffer) => (log += d.toString()));
    logs.push(["Ruby pool", () => log.slice(-8000)]);
    const logged = (attemptId: string, what: string) =>
      log.split("\n").find((l) => l.includes(`attempt_id=${attemptId}]`) && l.includes(what));

    const { task } = await state.sm.createTask({ namespace: "ruby_faults", name: "restart", context: {} });
    const attemptId = await eventually(
      "the step to be claimed",
      async () => (await state.sm.getAttempts(task.task_id))[0]?.attemptId,
    );
    await eventually("the Ruby handler to start", () => logged(attemptId, "] started"));
    await first.kill9();
    // The handler finishes while no broker is there: the pool keeps its result until an ACK.
    await eventually("the Ruby handler to finish", () => logged(attemptId, "] complete in"));
    await broker(endpoint, brokerId);

    const done = await eventually(
      "the task to finish",
      async () => {
        const t: TaskView | null = await state.sm.getTask(task.task_id, { includeSteps: true });
        return t && ["complete", "error", "cancelled"].includes(t.state) ? t : undefined;
      },
      30_000,
    );
    assert.equal(done.state, "complete");
    const step = stepOf(done, "work");
    assert.equal(step.attempts, 1);
    assert.deepEqual(step.output, { slept_ms: 1000, lang: "ruby" });
    const attempts = await state.sm.getAttempts(task.task_id);
    assert.deepEqual(
      attempts.map((a) => [a.attemptId, a.outcome]),
      [[attemptId, "complete"]],
      "one attempt, stored once",
    );
    // The pool said it still held the attempt, and the new broker adopted it.
    assert.match(log, /HELLO sent to .* running=1/);
    assert.match(log, /WELCOME from broker .* adopted=1/);
    assert.equal(
      log.split("\n").filter((l) => l.includes(`attempt_id=${attemptId}]`) && l.includes("] started")).length,
      1,
      "the handler ran once",
    );
  });
});
