/** Runs commands, and the real `stepbroker` CLI, as child processes as a person would, bounded in time. */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { availableParallelism } from "node:os";
import { join } from "node:path";

/** The CLI's entry point, as `npx stepbroker` runs it. */
export const CLI = join(import.meta.dirname, "..", "..", "bin", "stepbroker.js");

export interface CliRun {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Resolves with the exit code and output; rejects (after SIGKILL) when it runs past `timeoutMs`. */
export function runCommand(
  cmd: string,
  args: string[],
  env: NodeJS.ProcessEnv = {},
  timeoutMs = 30_000,
): Promise<CliRun> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    const t = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`${cmd} ${args.join(" ")} did not finish in ${timeoutMs} ms: ${stderr}`));
    }, timeoutMs);
    child.once("exit", (code) => {
      clearTimeout(t);
      resolve({ code, stdout, stderr });
    });
  });
}

/** `stepbroker <args>`, through this Node. */
export function runCli(args: string[], env: NodeJS.ProcessEnv = {}, timeoutMs = 30_000): Promise<CliRun> {
  return runCommand(process.execPath, [CLI, ...args], env, timeoutMs);
}

/** The one line a refused command prints on stderr, with no stack trace. */
export function oneLine(r: CliRun): string {
  const lines = r.stderr.trim().split("\n");
  assert.equal(lines.length, 1, `expected one line on stderr, got:\n${r.stderr}`);
  assert.doesNotMatch(r.stderr, /\n\s+at /, "no stack trace without --verbose");
  return lines[0]!;
}

/**
 * Runs independent commands a few at a time, resolving with their results in
 * the order given. Each CLI start costs over a second of CPU (tsx and the
 * whole module graph), and one at a time leaves a core idle; callers assert
 * on the results afterwards exactly as they would have one by one. A failure
 * is thrown once every job has ended, so none outlives the test.
 */
export async function runAll<const J extends readonly (() => Promise<unknown>)[]>(
  jobs: J,
  concurrency = availableParallelism() + 1,
): Promise<{ -readonly [K in keyof J]: Awaited<ReturnType<J[K]>> }> {
  const out: PromiseSettledResult<unknown>[] = new Array(jobs.length);
  let next = 0;
  const worker = async (): Promise<void> => {
    for (let i = next++; i < jobs.length; i = next++) {
      try {
        out[i] = { status: "fulfilled", value: await jobs[i]!() };
      } catch (reason) {
        out[i] = { status: "rejected", reason };
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, jobs.length) }, worker));
  const failed = out.find((r) => r.status === "rejected");
  if (failed !== undefined) throw failed.reason;
  return out.map((r) => (r as PromiseFulfilledResult<unknown>).value) as {
    -readonly [K in keyof J]: Awaited<ReturnType<J[K]>>;
  };
}
