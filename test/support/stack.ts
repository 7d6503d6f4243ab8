/**
 * A real broker on a real PostgreSQL schema of its own, for end-to-end tests:
 * `useBrokerStack("e2e", ...)` registers hooks that migrate a fresh schema,
 * register the test templates and start a broker; everything is stopped and
 * dropped afterwards.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { once } from "node:events";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import type pg from "pg";
import { pino } from "pino";
import { Broker } from "../../broker/Broker";
import type { BrokerOptions } from "../../broker/config";
import { openDatabase } from "../../broker/db/openDatabase";
import { StateManager } from "../../broker/state/StateManager";
import type { TaskView } from "../../protocol";
import { databaseUrl, dropSchema, uniqueSchemaName } from "./db";
import { assertInvariants } from "./invariants";

export const silent = pino({ level: process.env.TEST_LOG_LEVEL ?? "silent" });

export type Transport = "inproc" | "ipc" | "tcp";

/** A unique endpoint per call; tcp binds a free loopback port chosen by libzmq. */
export function uniqueEndpoint(transport: Transport, tmp: string): string {
  const id = randomBytes(4).toString("hex");
  if (transport === "inproc") return `inproc://sb-${id}`;
  if (transport === "ipc") return `ipc://${join(tmp, `b-${id}.sock`)}`;
  return "tcp://127.0.0.1:*";
}

export interface Stack {
  sm: StateManager;
  broker: Broker;
  schema: string;
  tmp: string;
  /** The endpoint pools should connect to (the bound one). */
  endpoint: string;
  startBroker(overrides?: Partial<BrokerOptions>): Promise<Broker>;
  registerTemplate(def: unknown): Promise<void>;
  /** A query on the test schema (for assertions on the tables themselves, e.g. assertInvariants). */
  sql<R extends pg.QueryResultRow>(text: string, values?: unknown[]): Promise<R[]>;
  waitForTask(taskId: string, timeoutMs?: number): Promise<TaskView>;
}

// Short enough to keep tests quick, with liveness to spare on a loaded two-core machine.
export const FAST: Partial<BrokerOptions> = {
  heartbeatMs: 200,
  heartbeatLiveness: 5,
  pollMs: 100,
  leaseCheckMs: 50,
  recoveryGraceMs: 600,
};

export function useBrokerStack(
  label: string,
  transport: Transport,
  overrides: Partial<BrokerOptions> = {},
): Stack {
  const schema = uniqueSchemaName(label);
  const stack = { schema } as Stack;
  const brokers: Broker[] = [];
  before(async function () {
    this.timeout(30_000);
    stack.tmp = mkdtempSync(join(tmpdir(), "sb-test-"));
    const db = await openDatabase({ databaseUrl: databaseUrl(), schema, poolSize: 10 });
    stack.sm = new StateManager(db);
    await stack.sm.migrate();
    const requested = uniqueEndpoint(transport, stack.tmp);
    stack.startBroker = async (more: Partial<BrokerOptions> = {}) => {
      const broker = new Broker({
        endpoints: [stack.endpoint ?? requested],
        state: stack.sm,
        brokerId: `test-${schema}`,
        logger: silent,
        ...FAST,
        ...overrides,
        ...more,
      });
      await broker.start();
      brokers.push(broker);
      stack.broker = broker;
      stack.endpoint = broker.endpoints[0]!;
      return broker;
    };
    stack.sql = async <R extends pg.QueryResultRow>(text: string, values?: unknown[]) =>
      (await stack.sm.db.pool.query<R>(text, values)).rows;
    stack.registerTemplate = async (def) => {
      await stack.sm.registerTemplate(def);
    };
    stack.waitForTask = async (taskId, timeoutMs = 15_000) => {
      const out = await stack.broker.wait(taskId, timeoutMs);
      if (!out) throw new Error(`no task ${taskId}`);
      if (!out.finished)
        throw new Error(`task ${taskId} did not finish within ${timeoutMs} ms: ${JSON.stringify(out.task)}`);
      return out.task;
    };
    await stack.startBroker();
  });
  after(async function () {
    this.timeout(60_000);
    for (const b of brokers) await b.stop({ drainMs: 0 }).catch(() => undefined);
    try {
      // Whatever a suite did to its broker, the history it left is whole (DESIGN.md, "History is insert-only").
      if (stack.sm) await assertInvariants(stack);
    } finally {
      await stack.sm?.close();
      await dropSchema(schema);
      rmSync(stack.tmp, { recursive: true, force: true });
    }
  });
  return stack;
}

const POOL_FIXTURE = join(import.meta.dirname, "..", "handlers-node", "fixtures", "pool-process.ts");

export interface ChildPool {
  child: ChildProcess;
  poolId: string;
  stop(): Promise<void>;
  kill9(): Promise<void>;
}

/** Spawns a handler pool process and resolves once it printed READY (was welcomed). */
export async function spawnNodePool(
  endpoint: string,
  args: string[],
  timeoutMs = 15_000,
): Promise<ChildPool> {
  return spawnPool(
    process.execPath,
    ["--import", "tsx", POOL_FIXTURE, "--endpoint", endpoint, ...args],
    timeoutMs,
  );
}

export async function spawnPool(
  cmd: string,
  args: string[],
  timeoutMs = 15_000,
  env: NodeJS.ProcessEnv = {},
): Promise<ChildPool> {
  const child = spawn(cmd, args, { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, ...env } });
  let stderr = "";
  child.stderr!.on("data", (d: Buffer) => (stderr = (stderr + d.toString()).slice(-4000)));
  const lines = createInterface({ input: child.stdout! });
  const exited = once(child, "exit");
  const gone = (): boolean => child.exitCode !== null || child.signalCode !== null;
  const ready = new Promise<string>((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`pool did not print READY within ${timeoutMs} ms: ${stderr}`)),
      timeoutMs,
    );
    lines.on("line", (line) => {
      const m = /^READY (.+)$/.exec(line.trim());
      if (m) {
        clearTimeout(timer);
        resolve(m[1]!);
      }
    });
    child.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`pool exited with ${code} before READY: ${stderr}`));
    });
  });
  let poolId: string;
  try {
    poolId = await ready;
  } catch (e) {
    // a pool that never got its WELCOME would otherwise outlive the test and keep mocha from exiting
    if (!gone()) {
      child.kill("SIGKILL");
      await exited;
    }
    throw e;
  }
  return {
    child,
    poolId,
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill("SIGTERM");
      const t = setTimeout(() => child.kill("SIGKILL"), 5000);
      await exited;
      clearTimeout(t);
    },
    async kill9() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill("SIGKILL");
      await exited;
    },
  };
}

/** Polls until `check` returns a value (not undefined), bounded in time. */
export async function eventually<T>(
  what: string,
  check: () => Promise<T | undefined> | T | undefined,
  timeoutMs = 10_000,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await check();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

export function stepOf(task: TaskView, name: string) {
  const s = task.steps?.find((x) => x.name === name);
  if (!s) throw new Error(`task has no step ${name}`);
  return s;
}
