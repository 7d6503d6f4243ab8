/**
 * CURVE from the command line, as an operator would run it: `stepbroker
 * keygen` for the broker, a pool and a client; a broker started with CURVE in
 * one network namespace, bound to an address that exists only there; a pool
 * and `stepbroker submit --wait` in a second namespace, joined to the first
 * by a veth pair, complete a task. No traffic leaves the machine.
 *
 * The namespaces need root and `ip netns`; without them those tests are
 * skipped, saying why. The broker in the first namespace cannot see the test
 * database (on 127.0.0.1 of the root namespace), so it runs its own embedded
 * PostgreSQL in a temporary data directory, on that namespace's loopback.
 *
 * The option checks at the end need neither and always run.
 */
import { strict as assert } from "node:assert";
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { once } from "node:events";
import {
  appendFileSync,
  chmodSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { CLI, type CliRun, oneLine, runAll, runCli, runCommand } from "./support/runCli";

const POOL_FIXTURE = join(import.meta.dirname, "handlers-node", "fixtures", "pool-process.ts");
const SETUP_NETNS = join(import.meta.dirname, "..", "scripts", "setup-netns.sh");
const TEMPLATE = {
  namespace: "netns",
  name: "echo",
  version: "1",
  steps: [{ name: "only", handler: "echo" }],
};
/** Addresses inside the namespaces only (a /30 of the private 10.0.0.0/8). */
const ADDR_A = "10.213.7.1";
const ADDR_B = "10.213.7.2";

function run(cmd: string, args: string[], env: NodeJS.ProcessEnv = {}, timeoutMs = 30_000): Promise<CliRun> {
  return runCommand(cmd, args, env, timeoutMs);
}

function cli(args: string[], env: NodeJS.ProcessEnv = {}, timeoutMs = 30_000): Promise<CliRun> {
  return runCli(args, env, timeoutMs);
}

/** A long-running process whose output lines are kept, and which can be waited on for a line. */
interface Proc {
  child: ChildProcess;
  output(): string;
  waitFor(re: RegExp, timeoutMs: number): Promise<string>;
  stop(): Promise<void>;
}

function startProc(cmd: string, args: string[], env: NodeJS.ProcessEnv): Proc {
  const child = spawn(cmd, args, { env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"] });
  const lines: string[] = [];
  const watchers = new Set<{ re: RegExp; hit(line: string): void }>();
  const onLine = (line: string) => {
    lines.push(line);
    if (lines.length > 2000) lines.shift();
    for (const w of watchers) if (w.re.test(line)) w.hit(line);
  };
  createInterface({ input: child.stdout! }).on("line", onLine);
  createInterface({ input: child.stderr! }).on("line", onLine);
  const exited = once(child, "exit");
  const gone = () => child.exitCode !== null || child.signalCode !== null;
  return {
    child,
    output: () => lines.join("\n"),
    waitFor(re, timeoutMs) {
      const seen = lines.find((l) => re.test(l));
      if (seen) return Promise.resolve(seen);
      return new Promise((resolve, reject) => {
        const w = {
          re,
          hit: (line: string) => {
            cleanup();
            resolve(line);
          },
        };
        const t = setTimeout(() => {
          cleanup();
          reject(new Error(`no line matching ${re} within ${timeoutMs} ms:\n${lines.slice(-30).join("\n")}`));
        }, timeoutMs);
        const onExit = () => {
          cleanup();
          reject(
            new Error(
              `${cmd} exited (${child.exitCode ?? child.signalCode}) before ${re}:\n${lines.join("\n")}`,
            ),
          );
        };
        const cleanup = () => {
          clearTimeout(t);
          watchers.delete(w);
          child.off("exit", onExit);
        };
        watchers.add(w);
        child.once("exit", onExit);
      });
    },
    async stop() {
      if (gone()) return;
      child.kill("SIGTERM");
      const t = setTimeout(() => child.kill("SIGKILL"), 15_000);
      await exited;
      clearTimeout(t);
    },
  };
}

/** Why the namespace tests cannot run here, or undefined when they can. */
function namespacesUnavailable(): string | undefined {
  if (process.getuid?.() !== 0) return "not running as root (ip netns needs CAP_SYS_ADMIN)";
  try {
    // Installs iproute2 when it is missing and apt-get can (we are root here).
    execFileSync("sh", [SETUP_NETNS], { stdio: "ignore", timeout: 300_000 });
  } catch {
    return "`ip netns` is not available and iproute2 could not be installed (see scripts/setup-netns.sh)";
  }
  return undefined;
}

describe("the CLI over CURVE between two network namespaces joined by a veth pair", function () {
  this.timeout(240_000);
  const id = randomBytes(3).toString("hex");
  const nsA = `sbA-${id}`;
  const nsB = `sbB-${id}`;
  const vethA = `sbva${id}`;
  const vethB = `sbvb${id}`;
  const poolEndpoint = `tcp://${ADDR_A}:5555`;
  const clientEndpoint = `tcp://${ADDR_A}:5556`;
  let tmp = "";
  let made: string[] = [];
  let broker: Proc | undefined;
  const pools: Proc[] = [];
  const env: NodeJS.ProcessEnv = { DATABASE_URL: "", STEPBROKER_LOG_LEVEL: "info" };

  const inA = (args: string[]) => ["netns", "exec", nsA, ...args];
  const inB = (args: string[]) => ["netns", "exec", nsB, ...args];
  const key = (name: string) => join(tmp, `${name}.key`);
  const pub = (name: string) => join(tmp, `${name}.pub`);

  function startPool(keyName: string, poolId: string): Proc {
    const p = startProc(
      "ip",
      inB([
        process.execPath,
        "--import",
        "tsx",
        POOL_FIXTURE,
        "--endpoint",
        poolEndpoint,
        "--handlers",
        "echo",
        "--pool-id",
        poolId,
        "--curve-server-key",
        pub("broker"),
        "--curve-key-file",
        key(keyName),
      ]),
      { STEPBROKER_LOG_LEVEL: "warn" },
    );
    pools.push(p);
    return p;
  }

  before(async function () {
    const why = namespacesUnavailable();
    if (why) {
      console.log(`      skipped: ${why}`);
      this.skip();
    }
    tmp = mkdtempSync(join(tmpdir(), "sb-netns-"));
    // The embedded server runs as user postgres when we are root: it must be able to enter.
    chmodSync(tmp, 0o755);
    const ip = (...args: string[]) => execFileSync("ip", args, { stdio: ["ignore", "ignore", "pipe"] });
    ip("netns", "add", nsA);
    made.push(nsA);
    ip("netns", "add", nsB);
    made.push(nsB);
    ip("link", "add", vethA, "type", "veth", "peer", "name", vethB);
    ip("link", "set", vethA, "netns", nsA);
    ip("link", "set", vethB, "netns", nsB);
    ip("-n", nsA, "addr", "add", `${ADDR_A}/30`, "dev", vethA);
    ip("-n", nsB, "addr", "add", `${ADDR_B}/30`, "dev", vethB);
    for (const [ns, dev] of [
      [nsA, vethA],
      [nsB, vethB],
    ] as const) {
      ip("-n", ns, "link", "set", dev, "up");
      // The broker's embedded PostgreSQL listens on the namespace's own 127.0.0.1.
      ip("-n", ns, "link", "set", "lo", "up");
    }
    const names = ["broker", "pool", "client", "stranger"];
    for (const r of await runAll(names.map((name) => () => cli(["keygen", "--out", join(tmp, name)]))))
      assert.equal(r.code, 0, r.stderr);
    writeFileSync(join(tmp, "pool-keys"), `# pools\n${readFileSync(pub("pool"), "utf8")}`);
    writeFileSync(join(tmp, "client-keys"), readFileSync(pub("client"), "utf8"));
    mkdirSync(join(tmp, "templates"));
    writeFileSync(join(tmp, "templates", "echo.json"), JSON.stringify(TEMPLATE));
    broker = startProc(
      "ip",
      inA([
        process.execPath,
        CLI,
        "start",
        "--endpoint",
        poolEndpoint,
        "--client-endpoint",
        clientEndpoint,
        "--curve-secret-key-file",
        key("broker"),
        "--pool-keys",
        join(tmp, "pool-keys"),
        "--client-keys",
        join(tmp, "client-keys"),
        "--data-dir",
        join(tmp, "pgdata"),
        "--templates",
        join(tmp, "templates"),
        "--heartbeat-ms",
        "300",
      ]),
      env,
    );
    await broker.waitFor(/broker listening on/, 150_000);
  });

  after(async function () {
    this.timeout(60_000);
    for (const p of pools) await p.stop();
    await broker?.stop();
    for (const ns of made) {
      // Whatever we started in there and is still alive (an orphaned database, say) goes first.
      try {
        const pids = execFileSync("ip", ["netns", "pids", ns], { encoding: "utf8" })
          .split(/\s+/)
          .filter(Boolean);
        for (const pid of pids) process.kill(Number(pid), "SIGKILL");
      } catch {
        // the namespace has no processes left
      }
      try {
        execFileSync("ip", ["netns", "del", ns], { stdio: "ignore" });
      } catch {
        // already gone
      }
    }
    made = [];
    if (tmp) rmSync(tmp, { recursive: true, force: true });
  });

  it("runs a task: broker in one namespace, pool and `submit --wait` in the other, all over CURVE", async () => {
    const pool = startPool("pool", "netns-pool");
    await pool.waitFor(/^READY netns-pool$/, 30_000);
    // The pool's key is not a client's: the same command with it gets no answer. It waits out
    // its own timeout, so it runs beside the submit rather than after it.
    const [r, asPool] = await runAll([
      () =>
        run(
          "ip",
          inB([
            process.execPath,
            CLI,
            "submit",
            "netns/echo",
            "--context",
            '{"from":"sbB"}',
            "--wait",
            "--endpoint",
            clientEndpoint,
            "--curve-server-key",
            pub("broker"),
            "--curve-key-file",
            key("client"),
            "--json",
          ]),
          {},
          60_000,
        ),
      () =>
        run(
          "ip",
          inB([
            process.execPath,
            CLI,
            "pools",
            "--endpoint",
            clientEndpoint,
            "--curve-server-key",
            pub("broker"),
            "--curve-key-file",
            key("pool"),
          ]),
          {},
          30_000,
        ),
    ]);
    assert.equal(r.code, 0, `submit --wait: ${r.stderr}`);
    const task = JSON.parse(r.stdout) as { state: string; steps: { output: { context: unknown } }[] };
    assert.equal(task.state, "complete");
    assert.deepEqual(task.steps[0]!.output.context, { from: "sbB" });
    assert.notEqual(asPool.code, 0, "a pool key is refused on the client socket");
    assert.match(
      oneLine(asPool),
      /Over CURVE a refused key gets no answer/,
      "and the error says what to check",
    );
  });

  it("keeps out a pool whose key is not on the allow-list, logs it, and lets it in after the key is added and SIGHUP", async () => {
    const stranger = startPool("stranger", "netns-stranger");
    await broker!.waitFor(/not on the pool allow-list/, 20_000);
    await assert.rejects(
      stranger.waitFor(/^READY/, 3000),
      /no line matching/,
      "no WELCOME for an unknown key",
    );
    appendFileSync(join(tmp, "pool-keys"), readFileSync(pub("stranger"), "utf8"));
    process.kill(broker!.child.pid!, "SIGHUP");
    await broker!.waitFor(/pool allow-list now has 2 keys \(1 added, 0 removed\)/, 10_000);
    // The same process gets in on one of its reconnects.
    await stranger.waitFor(/^READY netns-stranger$/, 30_000);
  });

  it("refuses to bind the namespace's address without CURVE unless --insecure", async () => {
    const r = await run(
      "ip",
      inA([
        process.execPath,
        CLI,
        "start",
        "--endpoint",
        `tcp://${ADDR_A}:5557`,
        "--data-dir",
        join(tmp, "pgdata"),
      ]),
      env,
    );
    assert.equal(r.code, 2);
    assert.match(oneLine(r), /refusing to bind tcp:\/\/10\.213\.7\.1:5557 beyond loopback without CURVE/);
  });
});

describe("the CLI's CURVE options", function () {
  this.timeout(60_000);
  let tmp = "";
  before(() => {
    tmp = mkdtempSync(join(tmpdir(), "sb-cli-curve-"));
  });
  after(() => rmSync(tmp, { recursive: true, force: true }));

  it("keygen writes a secret key file only its owner can read and a public one, and never overwrites them", async () => {
    const prefix = join(tmp, "k");
    const r = await cli(["keygen", "--out", prefix]);
    assert.equal(r.code, 0, r.stderr);
    const publicKey = readFileSync(`${prefix}.pub`, "utf8").trim();
    assert.match(publicKey, /^\S{40}$/);
    assert.equal(r.stdout.split("\n")[0], publicKey, "it prints the public key first");
    assert.equal(statSync(`${prefix}.key`).mode & 0o777, 0o600);
    const secret = readFileSync(`${prefix}.key`, "utf8");
    assert.match(secret, new RegExp(`public-key = ${publicKey.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}`));
    assert.match(secret, /secret-key = \S{40}/);
    const again = await cli(["keygen", "--out", prefix]);
    assert.notEqual(again.code, 0);
    assert.match(oneLine(again), /k\.key exists; remove it or choose another --out prefix/);
    assert.equal(readFileSync(`${prefix}.key`, "utf8"), secret, "the key pair is untouched");
  });

  for (const args of [
    ["start", "--curve-key", "x"],
    ["submit", "a/b", "--bogus"],
    ["keygen", "--out"],
    ["pools", "--endpoint"],
  ]) {
    it(`answers ${args.join(" ")} with one line and exit 2`, async () => {
      const r = await cli(args);
      assert.equal(r.code, 2, r.stderr);
      assert.match(oneLine(r), /^stepbroker: .*; see stepbroker --help$/);
    });
  }

  it("refuses bad CURVE settings for start in one line with exit 2, before opening any database", async () => {
    const prefix = join(tmp, "b");
    assert.equal((await cli(["keygen", "--out", prefix])).code, 0);
    writeFileSync(join(tmp, "empty-keys"), "# nobody yet\n");
    writeFileSync(join(tmp, "bad-keys"), "hello\n");
    const cases: [string[], RegExp][] = [
      [["--curve-secret-key-file", join(tmp, "missing.key")], /--curve-secret-key-file: .*missing\.key/],
      [["--curve-secret-key-file", `${prefix}.pub`], /b\.pub:1 is not "public-key = KEY"/],
      [["--curve-secret-key-file", `${prefix}.key`], /allow-list of the pool socket .* is empty/],
      [
        ["--curve-secret-key-file", `${prefix}.key`, "--pool-keys", join(tmp, "empty-keys")],
        /allow-list of the pool socket .* is empty/,
      ],
      [
        ["--curve-secret-key-file", `${prefix}.key`, "--pool-keys", join(tmp, "bad-keys")],
        /bad-keys:1 is not a 40-character Z85 public key/,
      ],
      [["--pool-keys", join(tmp, "empty-keys")], /--pool-keys needs --curve-secret-key-file/],
      [["--require-curve"], /CURVE is required \(--require-curve\)/],
      [["--heartbeat-ms", "soon"], /--heartbeat-ms must be a positive integer/],
    ];
    // An unreachable database URL: reaching it would fail differently (exit 1), so exit 2 proves it was never tried.
    const runs = await runAll(
      cases.map(
        ([args]) =>
          () =>
            cli(["start", "--endpoint", "tcp://127.0.0.1:1", ...args], {
              DATABASE_URL: "postgres://nobody:x@127.0.0.1:1/none",
            }),
      ),
    );
    cases.forEach(([args, re], i) => {
      const r = runs[i]!;
      assert.equal(r.code, 2, `${args.join(" ")}: ${r.stderr}`);
      assert.match(oneLine(r), re, args.join(" "));
    });
  });
});
