/**
 * The child-process pool fixture (fixtures/pool-process.ts) that broker
 * end-to-end tests use: it starts, says READY, runs its built-in handlers,
 * and after SIGTERM says DISCONNECT and exits by itself — which also shows
 * that close() leaves no socket, receive or timer keeping a process alive.
 */
import { strict as assert } from "node:assert";
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import type { ResultItem } from "../../protocol";
import { FakeBroker, stepFor, uniqueAddress, type Received } from "./support/fakeBroker";

const FIXTURE = fileURLToPath(new URL("./fixtures/pool-process.ts", import.meta.url));

interface Child {
  proc: ChildProcess;
  ready: Promise<string>;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  stderr: () => string;
}

function startChild(args: string[]): Child {
  const proc = spawn(process.execPath, ["--import", "tsx", FIXTURE, ...args], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, STEPBROKER_LOG_LEVEL: "warn" },
  });
  let err = "";
  proc.stderr!.on("data", (d: Buffer) => (err += d.toString()));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    proc.on("exit", (code, signal) => resolve({ code, signal })),
  );
  const ready = new Promise<string>((resolve, reject) => {
    const lines = createInterface({ input: proc.stdout! });
    lines.on("line", (line) => {
      const m = /^READY (.+)$/.exec(line);
      if (m) resolve(m[1]!);
    });
    void exited.then(({ code }) => reject(new Error(`pool-process exited (${code}) before READY: ${err}`)));
  });
  ready.catch(() => {});
  return { proc, ready, exited, stderr: () => err };
}

function results(r: Received): ResultItem[] {
  return (r.body as { results: ResultItem[] }).results;
}

describe("handlers-node pool-process fixture", function () {
  this.timeout(20_000);
  let broker: FakeBroker | undefined;
  let child: Child | undefined;
  let stateDir: string;

  beforeEach(function () {
    stateDir = mkdtempSync(join(tmpdir(), "sb-pool-process-"));
  });

  afterEach(async function () {
    if (child && child.proc.exitCode === null && child.proc.signalCode === null) {
      child.proc.kill("SIGKILL");
      await child.exited;
    }
    child = undefined;
    broker?.close();
    broker = undefined;
    rmSync(stateDir, { recursive: true, force: true });
  });

  it("says READY after WELCOME, runs its handlers, and exits cleanly on SIGTERM after DISCONNECT", async function () {
    broker = await FakeBroker.bind("ipc");
    child = startChild([
      "--endpoint",
      broker.endpoint,
      "--handlers",
      "process_payment=echo,flaky,nothing",
      "--capacity",
      "2",
      "--pool-id",
      "fixture-1",
      "--state-dir",
      stateDir,
    ]);
    const hello = await broker.next("HELLO", () => true, 15_000);
    assert.equal(hello.identity, "fixture-1");
    assert.deepEqual(hello.body.handlers, ["process_payment", "flaky", "nothing"]);
    assert.equal(hello.body.capacity, 2);
    // The fake broker sends no heartbeats: a long liveness keeps a slow machine from making the
    // pool leave it between two of the test's messages.
    await broker.welcome("fixture-1", { heartbeat_liveness: 100 });
    assert.equal(await child.ready, "fixture-1");

    const echo = stepFor("process_payment", {
      context: { order: 7 },
      config: { k: "v" },
      inputs: { validate: { ok: true } },
    });
    await broker.send("fixture-1", "STEP", { steps: [echo] });
    const out = results(await broker.next("RESULT"))[0]!;
    assert.equal(out.status, "complete");
    assert.deepEqual((out.output as { inputs: unknown; context: unknown; config: unknown }).inputs, {
      validate: { ok: true },
    });
    assert.deepEqual((out.output as { context: unknown }).context, { order: 7 });
    await broker.send("fixture-1", "ACK", { acks: [{ attempt_id: echo.attempt_id, outcome: "stored" }] });

    // flaky: fails twice for one step_id (retryable), then succeeds.
    const stepId = stepFor("flaky").step_id;
    const outcomes: string[] = [];
    for (let attempt = 1; attempt <= 3; attempt++) {
      const s = stepFor("flaky", { step_id: stepId, attempt, max_attempts: 3 });
      await broker.send("fixture-1", "STEP", { steps: [s] });
      const r = results(
        await broker.next("RESULT", (m) => results(m).some((i) => i.attempt_id === s.attempt_id)),
      )[0]!;
      outcomes.push(r.status === "complete" ? "complete" : `${r.error!.type}:${r.error!.retryable}`);
      await broker.send("fixture-1", "ACK", { acks: [{ attempt_id: s.attempt_id, outcome: "stored" }] });
    }
    assert.deepEqual(outcomes, ["FlakyFailure:true", "FlakyFailure:true", "complete"]);

    child.proc.kill("SIGTERM");
    const bye = await broker.next("DISCONNECT");
    assert.deepEqual(bye.body.handed_back, []);
    assert.deepEqual(await child.exited, { code: 0, signal: null }, child.stderr());
  });

  it("hands back a step that ignores its signal, then exits after --drain-ms", async function () {
    broker = await FakeBroker.bind("tcp");
    child = startChild([
      "--endpoint",
      broker.endpoint,
      "--handlers",
      "hang",
      "--pool-id",
      "fixture-2",
      "--drain-ms",
      "100",
      "--encoding",
      "msgpack",
    ]);
    await broker.next("HELLO", () => true, 15_000);
    await broker.welcome("fixture-2", { encoding: "msgpack", heartbeat_liveness: 100 });
    await child.ready;
    const s = stepFor("hang");
    await broker.send("fixture-2", "STEP", { steps: [s] });
    await broker.next("HEARTBEAT", (m) => m.body.in_flight === 1);
    child.proc.kill("SIGTERM");
    const first = await broker.next("DISCONNECT");
    assert.deepEqual(first.body.handed_back, []);
    assert.equal(first.encoding, "msgpack");
    const second = await broker.next("DISCONNECT");
    assert.deepEqual(second.body.handed_back, [s.attempt_id]);
    assert.deepEqual(await child.exited, { code: 0, signal: null }, child.stderr());
  });

  it("with --no-wait says READY with no broker at all, and still exits on SIGTERM", async function () {
    child = startChild([
      "--endpoint",
      uniqueAddress("ipc"),
      "--handlers",
      "echo",
      "--pool-id",
      "fixture-3",
      "--no-wait",
      "--heartbeat-ms",
      "50",
    ]);
    assert.equal(await child.ready, "fixture-3");
    child.proc.kill("SIGTERM");
    assert.deepEqual(await child.exited, { code: 0, signal: null }, child.stderr());
  });
});
