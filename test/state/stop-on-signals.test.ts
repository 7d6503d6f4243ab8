/**
 * A process that owns a throwaway embedded PostgreSQL (the test run's, a
 * benchmark's) stopped with Ctrl-C: its server stops and its directory goes,
 * instead of a postgres left running, orphaned, over a directory in /tmp.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { once } from "node:events";
import { existsSync } from "node:fs";
import fs from "node:fs/promises";
import path from "node:path";
import { createInterface } from "node:readline";

const root = path.join(import.meta.dirname, "..", "..");

/** Gone, or a zombie its new parent has not reaped yet: either way no longer running. */
async function running(pid: number): Promise<boolean> {
  const stat = await fs.readFile(`/proc/${pid}/stat`, "utf8").catch(() => "");
  return stat !== "" && !stat.slice(stat.lastIndexOf(")") + 2).startsWith("Z");
}

/**
 * Runs `script` (which prints "ready <data dir>" once its server runs), then sends `signal`, or
 * closes the pipe the script writes its output to, and checks what is left.
 */
async function interrupted(script: string, signal: NodeJS.Signals | "EPIPE"): Promise<void> {
  const env = { ...process.env };
  delete env.DATABASE_URL; // so the child starts a server of its own
  delete env.DATABASE_ADMIN_URL;
  const child = spawn(process.execPath, ["--import", "tsx", "--input-type=module", "-e", script], {
    cwd: root,
    env,
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stderr = "";
  child.stderr!.on("data", (b: Buffer) => (stderr += b.toString()));
  const exited = once(child, "exit");
  let dataDir: string | undefined;
  let postmaster: number | undefined;
  try {
    dataDir = await new Promise<string>((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`no server in 90 s: ${stderr}`)), 90_000);
      createInterface({ input: child.stdout! }).on("line", (l) => {
        if (l.startsWith("ready ")) {
          clearTimeout(t);
          resolve(l.slice("ready ".length));
        }
      });
      child.once("exit", (c) => reject(new Error(`exited with ${c} before its server ran: ${stderr}`)));
    });
    postmaster = Number((await fs.readFile(path.join(dataDir, "postmaster.pid"), "utf8")).split("\n")[0]);
    assert.ok(await running(postmaster), "the server runs before the signal");
    if (signal === "EPIPE") child.stdout!.destroy();
    else child.kill(signal);
    const [code] = (await Promise.race([
      exited,
      new Promise((_, reject) => setTimeout(() => reject(new Error(`no exit 30 s after ${signal}`)), 30_000)),
    ])) as [number | null];
    const number = { SIGINT: 2, SIGTERM: 15, EPIPE: 13 }[signal as string];
    assert.equal(code, 128 + number!, `exits as the signal would have (SIGPIPE for EPIPE): ${stderr}`);
    const name = signal === "EPIPE" ? "EPIPE on standard output" : signal;
    assert.ok(stderr.includes(`${name}: stopping the embedded PostgreSQL before exiting`), stderr);
    assert.equal(await running(postmaster), false, "its server was stopped");
    assert.equal(
      existsSync(path.dirname(dataDir)),
      false,
      `its directory ${path.dirname(dataDir)} was removed`,
    );
  } finally {
    // what a failure left behind goes too
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
    if (postmaster !== undefined && (await running(postmaster))) process.kill(postmaster, "SIGQUIT");
    if (dataDir !== undefined) await fs.rm(path.dirname(dataDir), { recursive: true, force: true });
  }
}

describe("a throwaway embedded PostgreSQL on Ctrl-C", function () {
  this.timeout(150_000);

  it("the test run's: stopped, its directory removed, with the signal's exit code", async () => {
    await interrupted(
      `import { mochaGlobalSetup } from "./test/support/global.ts";
       await mochaGlobalSetup();
       const { default: pg } = await import("pg");
       const c = new pg.Client({ connectionString: process.env.DATABASE_ADMIN_URL });
       await c.connect();
       const { rows } = await c.query("show data_directory");
       await c.end();
       console.log("ready " + rows[0].data_directory);
       setInterval(() => {}, 1000);`,
      "SIGINT",
    );
  });

  it("a benchmark's: stopped and removed on SIGTERM too", async () => {
    await interrupted(
      `import { openBenchDatabase } from "./bench/harness.ts";
       const db = await openBenchDatabase((l) => process.stderr.write(l + "\\n"));
       console.log("ready " + db.server.dataDir);
       setInterval(() => {}, 1000);`,
      "SIGTERM",
    );
  });

  it("a benchmark's whose output is piped to a reader that stops reading (EPIPE)", async () => {
    await interrupted(
      `import { openBenchDatabase } from "./bench/harness.ts";
       const db = await openBenchDatabase((l) => process.stderr.write(l + "\\n"));
       console.log("ready " + db.server.dataDir);
       setInterval(() => console.log("still writing"), 50);`,
      "EPIPE",
    );
  });
});
