/**
 * The embedded PostgreSQL: a data directory initialised once and reused, one
 * from an earlier stepbroker upgraded, and a server that is its OS user's
 * alone. The last part runs a child process as user `nobody` (when the test
 * runs as root, as CI does) that tries every door: the Unix socket, TCP on
 * loopback, the credentials file.
 */
import assert from "node:assert/strict";
import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import { once } from "node:events";
import { existsSync } from "node:fs";
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { createInterface } from "node:readline";
import pg from "pg";
import { pino } from "pino";
import { runningEmbeddedUrl, startEmbeddedPostgres } from "../../broker/db/embedded";
import { credentialsFile, readCredentials } from "../../broker/db/embeddedCredentials";
import type { Logger } from "../../broker/db/logger";
import { openDatabase } from "../../broker/db/openDatabase";
import { StateManager } from "../../broker/state/StateManager";

const CLI = path.join(import.meta.dirname, "..", "..", "bin", "stepbroker.js");
const TEMPLATES = path.join(import.meta.dirname, "..", "..", "examples", "order-fulfilment");
const isRoot = process.getuid?.() === 0;

/** pg_hba.conf as initdb --auth=scram-sha-256 wrote it for earlier stepbroker versions. */
const LEGACY_HBA = `local   all             all                                     scram-sha-256
host    all             all             127.0.0.1/32            scram-sha-256
host    all             all             ::1/128                 scram-sha-256
local   replication     all                                     scram-sha-256
host    replication     all             127.0.0.1/32            scram-sha-256
host    replication     all             ::1/128                 scram-sha-256
`;

/** A logger that keeps its warnings, to count what an upgrade says. */
function recordingLogger(): Logger & { warnings: string[] } {
  const warnings: string[] = [];
  const noop = (): void => undefined;
  return {
    warnings,
    debug: noop,
    info: noop,
    error: noop,
    warn: (_obj, msg) => void warnings.push(msg ?? ""),
  };
}

async function connect(url: string): Promise<pg.Client> {
  const client = new pg.Client({ connectionString: url, connectionTimeoutMillis: 10_000 });
  await client.connect();
  return client;
}

async function sqlErrorCode(client: pg.Client, sql: string): Promise<string | undefined> {
  try {
    await client.query(sql);
    return undefined;
  } catch (err) {
    return (err as { code?: string }).code;
  }
}

describe("embedded PostgreSQL", () => {
  let dir: string;

  before(async () => {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), "stepbroker-embedded-"));
  });
  after(async () => {
    await fs.rm(dir, { recursive: true, force: true });
  });

  it("initialises a data directory once, reuses it, and survives a stale postmaster.pid", async function () {
    this.timeout(120_000);
    const dataDir = path.join(dir, "nested", "pgdata");
    // databaseUrl "" ignores any DATABASE_URL of the test run: start our own server
    const first = await openDatabase({ databaseUrl: "", dataDir, schema: "embedded_test" });
    try {
      assert.equal(first.embedded, true);
      assert.ok(existsSync(path.join(dataDir, "PG_VERSION")));
      await first.pool.query(`create schema embedded_test`);
      await first.pool.query(`create table kept (v text)`);
      await first.pool.query(`insert into kept values ('from the first run')`);
    } finally {
      await first.close();
    }
    assert.equal(existsSync(path.join(dataDir, "postmaster.pid")), false, "stopped cleanly");

    // a killed run leaves its pid file behind; that process no longer exists
    const gone = spawnSync(process.execPath, ["-e", "process.exit(0)"]).pid ?? 999_999;
    await fs.writeFile(path.join(dataDir, "postmaster.pid"), `${gone}\n${dataDir}\n`);

    const second = await openDatabase({ databaseUrl: "", dataDir, schema: "embedded_test" });
    try {
      const { rows } = await second.pool.query<{ v: string }>(`select v from kept`);
      assert.deepEqual(
        rows,
        [{ v: "from the first run" }],
        "the data directory was reused, not initialised again",
      );
    } finally {
      await second.close();
    }
  });

  it("stops the server a broker killed with SIGKILL left running, and starts in its directory", async function () {
    this.timeout(120_000);
    const dataDir = path.join(dir, "orphaned");
    // A process that starts the embedded server and is then killed without a chance to stop it.
    const script = `import { startEmbeddedPostgres } from ${JSON.stringify(new URL("../../broker/db/embedded.ts", import.meta.url).pathname)};
      await startEmbeddedPostgres({ dataDir: ${JSON.stringify(dataDir)} });
      console.log("ready");
      setInterval(() => {}, 1000);`;
    const owner = spawn(process.execPath, ["--import", "tsx", "--input-type=module", "-e", script], {
      stdio: ["ignore", "pipe", "inherit"],
    });
    await new Promise<void>((resolve, reject) => {
      const t = setTimeout(
        () => reject(new Error("the owner process did not start its server in 90 s")),
        90_000,
      );
      createInterface({ input: owner.stdout! }).on("line", (l) => {
        if (l === "ready") {
          clearTimeout(t);
          resolve();
        }
      });
      owner.once("exit", (c) => reject(new Error(`the owner process exited with ${c}`)));
    });
    const orphan = Number((await fs.readFile(path.join(dataDir, "postmaster.pid"), "utf8")).split("\n")[0]);
    const exited = once(owner, "exit");
    owner.kill("SIGKILL");
    await exited;
    assert.doesNotThrow(() => process.kill(orphan, 0), "the server outlives the process that started it");

    const lines: { msg: string; level: number }[] = [];
    const logger = pino({ level: "warn" }, { write: (l: string) => lines.push(JSON.parse(l)) });
    const server = await startEmbeddedPostgres({ dataDir, logger });
    try {
      // gone, or a zombie its new parent has not reaped yet: either way no longer running
      const stat = await fs.readFile(`/proc/${orphan}/stat`, "utf8").catch(() => "");
      assert.ok(
        stat === "" || stat.slice(stat.lastIndexOf(")") + 2).startsWith("Z"),
        `the orphaned server was stopped: ${stat}`,
      );
      assert.ok(
        lines.some((l) =>
          l.msg.includes(
            `stopping the embedded PostgreSQL (pid ${orphan}) that a killed broker left running`,
          ),
        ),
        JSON.stringify(lines),
      );
      const client = new pg.Client({ connectionString: server.url });
      await client.connect();
      await client.query("select 1");
      await client.end();
    } finally {
      await server.stop();
    }
  });

  it("falls back to a private temporary socket directory when the path beside the data directory is too long", async function () {
    this.timeout(120_000);
    // 107 bytes is all sun_path holds; this parent alone is longer
    const deep = path.join(dir, "d".repeat(60), "e".repeat(60));
    const server = await startEmbeddedPostgres({ dataDir: path.join(deep, "pgdata") });
    const socketDir = server.socketDir;
    try {
      assert.ok(socketDir.startsWith(path.join(os.tmpdir(), "stepbroker-pg-")), socketDir);
      assert.equal((await fs.stat(socketDir)).mode & 0o777, 0o700);
      const stored = await readCredentials(server.credentialsFile);
      assert.equal(stored?.socketDir, socketDir, "the credentials file says where the socket is");
      const url = await runningEmbeddedUrl(path.join(deep, "pgdata"));
      assert.ok(url !== undefined);
      const client = await connect(url);
      await client.end();
    } finally {
      await server.stop();
    }
    assert.equal(existsSync(socketDir), false, "the temporary socket directory is removed on stop");
  });

  it("upgrades a data directory of an earlier stepbroker, once: new passwords, no host lines, schemas owned by the role", async function () {
    this.timeout(180_000);
    const dataDir = path.join(dir, "legacy", "pgdata");
    // Made as earlier versions left it: stepbroker's tables created by the superuser, the fixed
    // password "stepbroker", host lines in pg_hba.conf, and no credentials file.
    const fresh = await startEmbeddedPostgres({ dataDir });
    try {
      const old = await StateManager.open({ databaseUrl: fresh.adminUrl, schema: "stepbroker" });
      try {
        await old.migrate();
        await old.registerTemplate({
          namespace: "u",
          name: "one",
          version: "1",
          steps: [{ name: "w", handler: "h" }],
        });
        await old.createTasks([{ namespace: "u", name: "one", context: { from: "before the upgrade" } }]);
        await old.db.pool.query(`alter role postgres password 'stepbroker'`);
      } finally {
        await old.close();
      }
    } finally {
      await fresh.stop();
    }
    await fs.writeFile(path.join(dataDir, "pg_hba.conf"), LEGACY_HBA);
    await fs.rm(credentialsFile(dataDir));

    const logger = recordingLogger();
    const upgraded = await startEmbeddedPostgres({ dataDir, logger });
    try {
      assert.equal(
        logger.warnings.filter((w) => w.startsWith("upgrading")).length,
        1,
        logger.warnings.join("\n"),
      );
      const hba = await fs.readFile(path.join(dataDir, "pg_hba.conf"), "utf8");
      assert.doesNotMatch(hba, /^\s*host/m, "no host lines are left");
      assert.equal((await fs.stat(upgraded.credentialsFile)).mode & 0o777, 0o600);
      await assert.rejects(
        connect(upgraded.adminUrl.replace(/:[0-9a-f]{64}@/, ":stepbroker@")),
        (err: { code?: string }) => err.code === "28P01",
        "the fixed superuser password no longer works",
      );

      const sm = await StateManager.open({ databaseUrl: upgraded.url, schema: "stepbroker" });
      try {
        await sm.migrate();
        const owners = await sm.db.pool.query<{ owner: string; n: string }>(
          `select relowner::regrole::text as owner, count(*) as n from pg_class
           where relnamespace = 'stepbroker'::regnamespace group by 1`,
        );
        assert.deepEqual(
          owners.rows.map((r) => r.owner),
          ["stepbroker"],
          "every table and index now belongs to the role",
        );
        await sm.createTasks([{ namespace: "u", name: "one", context: { from: "after the upgrade" } }]);
        const claimed = await sm.claimSteps({ brokerId: "b", handlers: ["h"], limit: 10 });
        assert.equal(claimed.length, 2, "the task from before the upgrade is still there, and claimable");
        await sm.completeAttempts(
          claimed.map((c) => ({ attemptId: c.attempt_id, status: "complete" as const, output: {} })),
        );
      } finally {
        await sm.close();
      }
    } finally {
      await upgraded.stop();
    }

    const again = recordingLogger();
    const third = await startEmbeddedPostgres({ dataDir, logger: again });
    try {
      assert.deepEqual(again.warnings, [], "an upgraded directory starts without warnings");
      // as if an upgrade stopped after writing the credentials file but before the new password was set
      const admin = await connect(third.adminUrl);
      await admin.query(`alter role postgres password 'stepbroker'`);
      await admin.end();
    } finally {
      await third.stop();
    }
    const resumed = await startEmbeddedPostgres({ dataDir });
    try {
      const admin = await connect(resumed.adminUrl);
      await admin.end();
      await assert.rejects(
        connect(resumed.adminUrl.replace(/:[0-9a-f]{64}@/, ":stepbroker@")),
        (err: { code?: string }) => err.code === "28P01",
        "an interrupted upgrade is finished on the next start",
      );
    } finally {
      await resumed.stop();
    }
  });
});

describe("the embedded PostgreSQL of `stepbroker start` is its OS user's alone", function () {
  this.timeout(120_000);
  let dir = "";
  let dataDir = "";
  let broker: ChildProcess | undefined;
  const schema = "alone";
  const env = (): NodeJS.ProcessEnv => ({ ...process.env, DATABASE_URL: "", STEPBROKER_LOG_LEVEL: "warn" });

  before(async function () {
    this.timeout(120_000);
    dir = await fs.mkdtemp(path.join(os.tmpdir(), "stepbroker-alone-"));
    dataDir = path.join(dir, "pgdata");
    const child = spawn(
      process.execPath,
      [
        CLI,
        "start",
        "--data-dir",
        dataDir,
        "--endpoint",
        "tcp://127.0.0.1:*",
        "--schema",
        schema,
        "--templates",
        TEMPLATES,
        "--log-level",
        "info",
      ],
      { env: env(), stdio: ["ignore", "pipe", "pipe"] },
    );
    broker = child;
    let stderr = "";
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    await new Promise<void>((resolve, reject) => {
      const t = setTimeout(
        () => reject(new Error(`stepbroker start did not listen in 90 s: ${stderr}`)),
        90_000,
      );
      createInterface({ input: child.stdout }).on("line", (l) => {
        if (l.includes("broker listening")) {
          clearTimeout(t);
          resolve();
        }
      });
      child.once("exit", (c) => {
        clearTimeout(t);
        reject(new Error(`stepbroker start exited with ${c}: ${stderr}`));
      });
    });
  });
  after(async function () {
    this.timeout(60_000);
    if (broker !== undefined && broker.exitCode === null) {
      const exited = once(broker, "exit");
      broker.kill("SIGTERM");
      const force = setTimeout(() => broker?.kill("SIGKILL"), 30_000);
      await exited;
      clearTimeout(force);
    }
    await fs.rm(dir, { recursive: true, force: true });
  });

  /** Socket directory and port as the running server wrote them into postmaster.pid. */
  async function serverFiles(): Promise<{ socketDir: string; port: number; secrets: string }> {
    const lines = (await fs.readFile(path.join(dataDir, "postmaster.pid"), "utf8")).split("\n");
    return { port: Number(lines[3]), socketDir: lines[4] ?? "", secrets: credentialsFile(dataDir) };
  }

  it("listens on no TCP address, admits only the local socket, and keeps its files private", async () => {
    const { socketDir, secrets } = await serverFiles();
    assert.equal((await fs.stat(socketDir)).mode & 0o777, 0o700, "socket directory mode");
    assert.equal((await fs.stat(secrets)).mode & 0o777, 0o600, "credentials file mode");
    assert.equal((await fs.stat(dataDir)).mode & 0o777, 0o700, "data directory mode");
    const hba = await fs.readFile(path.join(dataDir, "pg_hba.conf"), "utf8");
    assert.deepEqual(
      hba.split("\n").filter((l) => l.trim() !== "" && !l.startsWith("#")),
      ["local all all scram-sha-256"],
    );
    const url = await runningEmbeddedUrl(dataDir);
    assert.ok(url !== undefined, "the same OS user finds the running server");
    const client = await connect(url);
    try {
      const { rows } = await client.query<{ listen_addresses: string }>("show listen_addresses");
      assert.equal(rows[0]?.listen_addresses, "");
    } finally {
      await client.end();
    }
  });

  it("connects the broker as a role that is not a superuser and cannot run programs or read server files", async () => {
    const url = await runningEmbeddedUrl(dataDir);
    assert.ok(url !== undefined);
    const client = await connect(url);
    try {
      const { rows } = await client.query<{ user: string; rolsuper: boolean }>(
        "select current_user as user, rolsuper from pg_roles where rolname = current_user",
      );
      assert.deepEqual(rows, [{ user: "stepbroker", rolsuper: false }]);
      assert.equal(await sqlErrorCode(client, "copy (select 1) to program 'id'"), "42501");
      assert.equal(await sqlErrorCode(client, "select pg_read_file('PG_VERSION')"), "42501");
      assert.equal(await sqlErrorCode(client, "create role intruder superuser"), "42501");
      const owner = await client.query<{ owner: string }>(
        "select nspowner::regrole::text as owner from pg_namespace where nspname = $1",
        [schema],
      );
      assert.deepEqual(owner.rows, [{ owner: "stepbroker" }], "the broker's role owns its schema");
    } finally {
      await client.end();
    }
  });

  it("lets `stepbroker status` of the same OS user use the running server", async () => {
    const r = spawnSync(
      process.execPath,
      [CLI, "status", "00000000-0000-4000-8000-000000000000", "--data-dir", dataDir, "--schema", schema],
      { env: env(), encoding: "utf8", timeout: 30_000 },
    );
    assert.match(r.stderr, /no task 00000000-0000-4000-8000-000000000000/, r.stderr);
  });

  it("shuts another OS user out: no socket, no TCP, no credentials file, even knowing the passwords", async function () {
    if (!isRoot) {
      console.warn("      (skipped: needs root, to run a child process as user nobody)");
      this.skip();
    }
    const { socketDir, port, secrets } = await serverFiles();
    const stored = await readCredentials(secrets);
    assert.ok(stored !== undefined);
    // A script nobody can read, in a directory nobody can enter: node_modules and the worktree may not be.
    const scriptDir = await fs.mkdtemp(path.join(os.tmpdir(), "stepbroker-nobody-"));
    try {
      await fs.chmod(scriptDir, 0o755);
      const script = path.join(scriptDir, "try-doors.cjs");
      await fs.writeFile(
        script,
        `const net = require("node:net");
const fs = require("node:fs");
const [socketDir, port, secrets] = process.argv.slice(2);
const tryConnect = (opts) => new Promise((resolve) => {
  const s = net.connect(opts);
  s.setTimeout(5000, () => { s.destroy(); resolve("timeout"); });
  s.once("connect", () => { s.destroy(); resolve("connected"); });
  s.once("error", (e) => resolve(e.code));
});
const tryFs = (f) => { try { f(); return "read"; } catch (e) { return e.code; } };
(async () => {
  const out = {
    socket: await tryConnect({ path: socketDir + "/.s.PGSQL." + port }),
    tcp4: await tryConnect({ host: "127.0.0.1", port: Number(port) }),
    tcp6: await tryConnect({ host: "::1", port: Number(port) }),
    socketDirListing: tryFs(() => fs.readdirSync(socketDir)),
    credentials: tryFs(() => fs.readFileSync(secrets)),
  };
  process.stdout.write(JSON.stringify(out));
})();
`,
      );
      await fs.chmod(script, 0o644);
      const asNobody = (cmd: string, args: string[], extraEnv: NodeJS.ProcessEnv = {}) =>
        spawnSync("setpriv", ["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", cmd, ...args], {
          cwd: "/",
          env: { PATH: process.env.PATH ?? "/usr/bin:/bin", ...extraEnv },
          encoding: "utf8",
          timeout: 30_000,
        });

      const doors = asNobody(process.execPath, [script, socketDir, String(port), secrets]);
      assert.equal(doors.status, 0, doors.stderr);
      const seen = JSON.parse(doors.stdout) as Record<string, string>;
      assert.equal(seen.socket, "EACCES", "the socket's directory shuts nobody out");
      assert.notEqual(seen.tcp4, "connected", "nothing listens on 127.0.0.1");
      assert.notEqual(seen.tcp6, "connected", "nothing listens on ::1");
      assert.equal(seen.socketDirListing, "EACCES");
      assert.equal(seen.credentials, "EACCES", "the passwords are not readable");

      // psql as nobody, given the real passwords: the directory, not the password, keeps it out
      if (spawnSync("psql", ["--version"]).status !== 0) {
        console.warn("      (psql not installed: the login attempts as nobody are left out)");
        return;
      }
      const logins: [string, string, string][] = [
        ["socket, superuser", `host=${socketDir} port=${port} user=postgres`, stored.superuserPassword],
        ["socket, role", `host=${socketDir} port=${port} user=stepbroker`, stored.rolePassword],
        [
          "tcp, fixed password of earlier versions",
          `host=127.0.0.1 port=${port} user=postgres`,
          "stepbroker",
        ],
      ];
      for (const [what, conninfo, password] of logins) {
        const r = asNobody("psql", ["-X", "-w", "-At", "-c", "select 1", `${conninfo} dbname=postgres`], {
          PGPASSWORD: password,
          PGCONNECT_TIMEOUT: "5",
        });
        assert.notEqual(r.status, 0, `${what}: psql as nobody connected: ${r.stdout}`);
        assert.doesNotMatch(r.stdout, /^1$/m, what);
        if (what.startsWith("socket")) assert.match(r.stderr, /Permission denied/, `${what}: ${r.stderr}`);
      }
    } finally {
      await fs.rm(scriptDir, { recursive: true, force: true });
    }
  });
});
