/**
 * The stepbroker command line, run as a person would: real processes, a real
 * broker, a real PostgreSQL schema of its own.
 */
import { strict as assert } from "node:assert";
import { spawn, type ChildProcess } from "node:child_process";
import { once } from "node:events";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { StateManager } from "../broker/state/StateManager";
import { databaseUrl, dropSchema, uniqueSchemaName } from "./support/db";
import { CLI, oneLine, runAll, runCli as cli } from "./support/runCli";
import { spawnNodePool, type ChildPool } from "./support/stack";

const TEMPLATES = join(import.meta.dirname, "..", "examples", "order-fulfilment");

async function freePort(): Promise<number> {
  const srv = net.createServer();
  await new Promise<void>((r) => srv.listen(0, "127.0.0.1", r));
  const port = (srv.address() as net.AddressInfo).port;
  await new Promise((r) => srv.close(r));
  return port;
}

describe("the stepbroker CLI", function () {
  this.timeout(60_000);
  const schema = uniqueSchemaName("cli");
  // Filled in before(): the global setup starts the database after files load.
  const env: NodeJS.ProcessEnv = { STEPBROKER_LOG_LEVEL: "warn" };
  let tmp = "";
  before(() => {
    env.DATABASE_URL = databaseUrl();
    tmp = mkdtempSync(join(tmpdir(), "sb-cli-"));
  });
  after(async () => {
    await dropSchema(schema);
    rmSync(tmp, { recursive: true, force: true });
  });

  it("prints its help and exits 0", async () => {
    const r = await cli(["--help"]);
    assert.equal(r.code, 0);
    assert.match(r.stdout, /Commands:/);
    assert.match(r.stdout, /explain <task>/);
    assert.match(r.stdout, /brokers {2,}the brokers sharing this database/);
  });

  it("says in one line that a template file does not parse, and exits non-zero", async () => {
    const file = join(tmp, "broken.yaml");
    writeFileSync(file, "namespace: shop\nsteps: [ {name: a\n");
    const r = await cli(["templates", "validate", file], env);
    assert.notEqual(r.code, 0);
    assert.match(oneLine(r), /broken\.yaml does not parse/);
  });

  it("names a cycle in a template and where it is", async () => {
    const file = join(tmp, "cycle.json");
    writeFileSync(
      file,
      JSON.stringify({
        namespace: "t",
        name: "c",
        version: "1",
        steps: [
          { name: "a", handler: "h", depends_on: ["b"] },
          { name: "b", handler: "h", depends_on: ["a"] },
        ],
      }),
    );
    const r = await cli(["templates", "validate", file], env);
    assert.notEqual(r.code, 0);
    assert.match(oneLine(r), /cycle/);
  });

  it("says there is no such task for an unknown id", async () => {
    const r = await cli(["status", "00000000-0000-4000-8000-000000000000", "--schema", schema], env);
    assert.notEqual(r.code, 0);
    assert.match(oneLine(r), /no task 00000000-0000-4000-8000-000000000000/);
  });

  it("lists the brokers sharing the database: alive, dead or stopped, with heartbeat age and in-flight steps", async () => {
    const none = await cli(["brokers", "--schema", schema], env);
    assert.equal(none.code, 0, none.stderr);
    assert.match(none.stdout, /no broker has registered in this database/);
    const sm = await StateManager.open({ databaseUrl: databaseUrl(), schema });
    try {
      const base = { version: "9.9.9", pid: 1, host: "h" };
      await sm.registerBroker({ ...base, brokerId: "cli-alive", endpoints: ["tcp://127.0.0.1:5555"] });
      await sm.registerBroker({ ...base, brokerId: "cli-dead", endpoints: ["ipc:///tmp/d"] });
      await sm.registerBroker({ ...base, brokerId: "cli-stopped", endpoints: [] });
      await sm.markBrokerStopped("cli-stopped");
      await sm.db.pool.query(
        `update brokers set last_heartbeat_at = now() - interval '42 seconds' where broker_id = 'cli-dead'`,
      );
    } finally {
      await sm.close();
    }
    // The live broker heartbeats as a running one would: each CLI start can take seconds on a busy machine.
    const beat = async (): Promise<void> => {
      const live = await StateManager.open({ databaseUrl: databaseUrl(), schema });
      try {
        assert.equal(await live.heartbeatBroker("cli-alive"), true);
      } finally {
        await live.close();
      }
    };
    await beat();
    // Both right after one heartbeat: the live broker must still look alive to each.
    const [text, json] = await runAll([
      () => cli(["brokers", "--schema", schema], env),
      () => cli(["brokers", "--schema", schema, "--json"], env),
    ]);
    assert.equal(text.code, 0, text.stderr);
    const lines = text.stdout.trim().split("\n");
    assert.equal(lines.length, 3);
    assert.match(
      lines.find((l) => l.startsWith("cli-alive")) ?? "",
      /alive .*in flight 0 .*v9\.9\.9 .*tcp:\/\/127\.0\.0\.1:5555/,
    );
    assert.match(lines.find((l) => l.startsWith("cli-dead")) ?? "", /dead .*heartbeat 4\d\.\d s ago/);
    assert.match(lines.find((l) => l.startsWith("cli-stopped")) ?? "", /stopped/);
    const rows = JSON.parse(json.stdout) as {
      brokerId: string;
      status: string;
      alive: boolean;
      inFlight: number;
    }[];
    assert.deepEqual(rows.map((r) => [r.brokerId, r.status, r.alive, r.inFlight]).sort(), [
      ["cli-alive", "alive", true, 0],
      ["cli-dead", "dead", false, 0],
      ["cli-stopped", "stopped", false, 0],
    ]);
  });

  it("says what to do when the database cannot be reached", async () => {
    const port = await freePort();
    const r = await cli(
      ["migrate", "--database-url", `postgres://postgres:x@127.0.0.1:${port}/postgres`, "--schema", schema],
      {
        ...env,
        DATABASE_URL: "",
      },
    );
    assert.equal(r.code, 1);
    assert.match(oneLine(r), /^stepbroker: /);
  });

  it("says the port is in use when another process holds it", async () => {
    const srv = net.createServer();
    await new Promise<void>((r) => srv.listen(0, "127.0.0.1", r));
    const port = (srv.address() as net.AddressInfo).port;
    try {
      const r = await cli(
        ["start", "--endpoint", `tcp://127.0.0.1:${port}`, "--schema", schema, "--log-level", "error"],
        env,
      );
      assert.equal(r.code, 1);
      assert.match(oneLine(r), /cannot bind tcp:\/\/127\.0\.0\.1:\d+: another process uses this address/);
    } finally {
      await new Promise((r) => srv.close(r));
    }
  });

  it("refuses to serve HTTP beyond loopback without a token, in one line", async () => {
    const empty = join(tmp, "empty-token");
    writeFileSync(empty, "\n");
    const [r, both, short, e] = await runAll([
      () => cli(["start", "--http", "0.0.0.0:0", "--schema", schema, "--log-level", "error"], env),
      () => cli(["start", "--http", "127.0.0.1:0", "--no-http", "--schema", schema], env),
      () => cli(["start", "--schema", schema], { ...env, STEPBROKER_HTTP_TOKEN: "short" }),
      () => cli(["start", "--http-token-file", empty, "--schema", schema], env),
    ]);
    assert.equal(r.code, 2);
    assert.match(
      oneLine(r),
      /--http: refusing to serve HTTP on 0\.0\.0\.0:0 \(not loopback\) without a token: set --http-token-file FILE or STEPBROKER_HTTP_TOKEN, or pass --insecure/,
    );
    assert.equal(both.code, 2);
    assert.match(oneLine(both), /--http and --no-http contradict each other/);
    assert.equal(short.code, 2);
    assert.match(oneLine(short), /STEPBROKER_HTTP_TOKEN: the HTTP token must be at least 16 characters/);
    assert.equal(e.code, 2);
    assert.match(oneLine(e), /the HTTP token file .* is empty/);
  });

  describe("against a running broker", () => {
    let broker: ChildProcess | undefined;
    let pool: ChildPool | undefined;
    let endpoint = "";
    let httpBase = "";

    before(async () => {
      endpoint = `tcp://127.0.0.1:${await freePort()}`;
      const httpPort = await freePort();
      httpBase = `http://127.0.0.1:${httpPort}`;
      broker = spawn(
        process.execPath,
        [
          CLI,
          "start",
          "--endpoint",
          endpoint,
          "--schema",
          schema,
          "--templates",
          TEMPLATES,
          "--heartbeat-ms",
          "200",
          "--http",
          `127.0.0.1:${httpPort}`,
          "--log-level",
          "info",
        ],
        { env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"] },
      );
      await new Promise<void>((resolve, reject) => {
        const t = setTimeout(() => reject(new Error("broker did not start")), 20_000);
        // the dashboard's line comes after the broker's: both are up then
        createInterface({ input: broker!.stdout! }).on("line", (l) => {
          if (l.includes("dashboard and metrics on")) {
            clearTimeout(t);
            resolve();
          }
        });
        broker!.once("exit", (c) => reject(new Error(`broker exited with ${c}`)));
      });
    });
    after(async () => {
      await pool?.stop();
      if (broker && broker.exitCode === null) {
        broker.kill("SIGTERM");
        await once(broker, "exit");
      }
    });

    it("lists no pools, then the pool that connects", async () => {
      const none = await cli(["pools", "--endpoint", endpoint], env);
      assert.equal(none.code, 0);
      assert.match(none.stdout, /no pools connected/);
      pool = await spawnNodePool(endpoint, [
        "--handlers",
        "validate_order=echo,reserve_inventory=echo,process_payment=echo,ship_order=echo",
        "--pool-id",
        "cli-pool",
        "--capacity",
        "4",
      ]);
      const some = await cli(["pools", "--endpoint", endpoint, "--json"], env);
      const pools = JSON.parse(some.stdout) as { pool_id: string; handlers: string[] }[];
      assert.equal(pools[0]?.pool_id, "cli-pool");
      assert.ok(pools[0]?.handlers.includes("ship_order"));
    });

    it("submits a task, waits for it, then shows its status and explains it", async () => {
      const submitted = await cli(
        [
          "submit",
          "shop/order_fulfilment",
          "--context",
          '{"order_id":"C-1","items":[]}',
          "--wait",
          "--json",
          "--endpoint",
          endpoint,
        ],
        env,
      );
      assert.equal(submitted.code, 0, submitted.stderr);
      const task = JSON.parse(submitted.stdout) as { task_id: string; state: string };
      assert.equal(task.state, "complete");
      const [status, explained] = await runAll([
        () => cli(["status", task.task_id, "--schema", schema], env),
        () => cli(["explain", task.task_id, "--schema", schema], env),
      ]);
      assert.equal(status.code, 0, status.stderr);
      assert.match(status.stdout, /ship_order\s+complete/);
      assert.equal(explained.code, 0, explained.stderr);
      assert.match(explained.stdout, /ship_order/);
    });

    it("serves the probes and /metrics beside the broker it started", async () => {
      const health = await fetch(`${httpBase}/healthz`, { signal: AbortSignal.timeout(5000) });
      assert.equal(health.status, 200);
      const ready = await fetch(`${httpBase}/readyz`, { signal: AbortSignal.timeout(5000) });
      assert.equal(ready.status, 200, await ready.text());
      const metrics = await (
        await fetch(`${httpBase}/metrics`, { signal: AbortSignal.timeout(5000) })
      ).text();
      assert.match(metrics, /^stepbroker_pools \d+$/m);
      assert.match(metrics, /^# TYPE stepbroker_queue_ready_steps gauge$/m);
    });

    it("prints a task's history as a timeline, and shows outputs in status", async () => {
      const submitted = await cli(
        [
          "submit",
          "shop/order_fulfilment",
          "--context",
          '{"order_id":"H-1","items":[]}',
          "--wait",
          "--json",
          "--endpoint",
          endpoint,
        ],
        env,
      );
      assert.equal(submitted.code, 0, submitted.stderr);
      const id = (JSON.parse(submitted.stdout) as { task_id: string }).task_id;
      const unknown = "00000000-0000-4000-8000-000000000000";
      // Seven reads of a finished task, none changing anything: they run side by side.
      const [history, asJson, viaBroker, viaBrokerJson, unknownVia, status, none] = await runAll([
        () => cli(["history", id, "--schema", schema], env),
        () => cli(["history", id, "--schema", schema, "--json"], env),
        () => cli(["history", id, "--endpoint", endpoint], env),
        () => cli(["history", id, "--endpoint", endpoint, "--json"], env),
        () => cli(["history", unknown, "--endpoint", endpoint], env),
        () => cli(["status", id, "--schema", schema], env),
        () => cli(["history", unknown, "--schema", schema], env),
      ]);
      assert.equal(history.code, 0, history.stderr);
      const lines = history.stdout.split("\n");
      assert.match(lines[0]!, new RegExp(`^task ${id} shop/order_fulfilment@\\S+: complete$`));
      const at = (re: RegExp) => lines.findIndex((l) => re.test(l));
      const created = at(/\(task\)\s+∅ → pending/);
      const sent = at(/ship_order\s+attempt 1 sent to cli-pool by /);
      const done = at(/ship_order\s+attempt 1 complete after \d+ ms/);
      const finished = at(/\(task\)\s+in_progress → complete/);
      assert.ok(created > 0 && sent > created && done > sent && finished >= done, history.stdout);
      assert.match(history.stdout, /^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} /m);
      const h = JSON.parse(asJson.stdout) as {
        task: { task_id: string };
        transitions: unknown[];
        attempts: { poolId: string }[];
      };
      assert.equal(h.task.task_id, id);
      assert.ok(h.transitions.length >= 10);
      assert.ok(h.attempts.every((a) => a.poolId === "cli-pool"));
      // With --endpoint the same history comes over the client protocol (HISTORY), not from the database.
      assert.equal(viaBroker.code, 0, viaBroker.stderr);
      assert.equal(viaBroker.stdout, history.stdout, "the same timeline, line for line");
      assert.deepEqual(JSON.parse(viaBrokerJson.stdout), h, "the same records as --json from the database");
      assert.notEqual(unknownVia.code, 0);
      assert.match(oneLine(unknownVia), /unknown_task/);
      assert.match(status.stdout, /validate_order\s+complete\s+attempts 1\/\d+\s+output \{/);
      assert.equal(none.code, 64);
      assert.match(
        oneLine(none),
        /no task 00000000-0000-4000-8000-000000000000; check the id \(stepbroker history <task-uuid>\)/,
      );
    });

    it("refuses a malformed --context in one line", async () => {
      const r = await cli(
        ["submit", "shop/order_fulfilment", "--context", "{oops", "--endpoint", endpoint],
        env,
      );
      assert.equal(r.code, 64);
      assert.match(oneLine(r), /--context must be a JSON object/);
    });
  });
});
