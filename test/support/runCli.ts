/** Runs commands, and the real `stepbroker` CLI, as child processes as a person would, bounded in time. */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
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
  timeoutMs = 20_000,
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
export function runCli(args: string[], env: NodeJS.ProcessEnv = {}, timeoutMs = 20_000): Promise<CliRun> {
  return runCommand(process.execPath, [CLI, ...args], env, timeoutMs);
}

/** The one line a refused command prints on stderr, with no stack trace. */
export function oneLine(r: CliRun): string {
  const lines = r.stderr.trim().split("\n");
  assert.equal(lines.length, 1, `expected one line on stderr, got:\n${r.stderr}`);
  assert.doesNotMatch(r.stderr, /\n\s+at /, "no stack trace without --verbose");
  return lines[0]!;
}
