/**
 * The Python and Ruby interpreters that cross-language tests need, set up by
 * the repository's own scripts (scripts/setup-python.sh, scripts/setup-ruby.sh)
 * once per mocha run.
 *
 * When an interpreter cannot be had, a test never passes silently: under CI
 * (`process.env.CI` set, other than 0/false) it fails with what is missing; elsewhere it is skipped
 * (shown as pending) after a loud message on stderr saying what to install.
 *
 *   before(async function () { python = await ensurePython(this); });
 */
import { execFile, spawn } from "node:child_process";
import { join } from "node:path";

const ROOT = join(import.meta.dirname, "..", "..");

/** Where setup-python.sh keeps its virtualenv, and the interpreter in it. */
export const VENV_PYTHON = join(ROOT, ".stepbroker", "venv", "bin", "python");

type Availability = { ok: true; command: string } | { ok: false; reason: string; install: string };

const SETUP_TIMEOUT_MS = 10 * 60_000;

/** Runs a command, resolving with its exit status and combined output (never rejects). */
function run(
  cmd: string,
  args: string[],
  timeoutMs: number,
): Promise<{ code: number | null; output: string; stdout: string }> {
  return new Promise((resolve) => {
    execFile(
      cmd,
      args,
      { cwd: ROOT, timeout: timeoutMs, maxBuffer: 16 * 1024 * 1024 },
      (err, stdout, stderr) => {
        const code = err === null ? 0 : typeof err.code === "number" ? err.code : null;
        const why = err !== null && typeof err.code !== "number" ? `\n(${err.message})` : "";
        resolve({ code, output: `${stdout}${stderr}${why}`.trim(), stdout: stdout.trim() });
      },
    );
  });
}

function tail(text: string, lines = 15): string {
  return text.split("\n").slice(-lines).join("\n");
}

async function setUpPython(): Promise<Availability> {
  const install =
    "Python 3.9+ with venv and pip (Debian/Ubuntu: apt-get install python3 python3-venv), then run scripts/setup-python.sh";
  const setup = await run("bash", [join(ROOT, "scripts", "setup-python.sh")], SETUP_TIMEOUT_MS);
  if (setup.code !== 0)
    return {
      ok: false,
      reason: `scripts/setup-python.sh exited with ${setup.code}:\n${tail(setup.output)}`,
      install,
    };
  const probe = await run(VENV_PYTHON, ["-c", "import stepbroker_handlers, zmq, msgpack, pytest"], 60_000);
  if (probe.code !== 0)
    return {
      ok: false,
      reason: `the venv's python cannot import the SDK and its test tools:\n${tail(probe.output)}`,
      install,
    };
  return { ok: true, command: VENV_PYTHON };
}

async function setUpRuby(): Promise<Availability> {
  const install =
    "apt-get install -y ruby ruby-ffi-rzmq ruby-msgpack (as root, scripts/setup-ruby.sh does it)";
  const setup = await run("sh", [join(ROOT, "scripts", "setup-ruby.sh")], SETUP_TIMEOUT_MS);
  if (setup.code !== 0)
    return {
      ok: false,
      reason: `scripts/setup-ruby.sh exited with ${setup.code}:\n${tail(setup.output)}`,
      install,
    };
  // the absolute path of the interpreter the script checked, for spawning
  const probe = await run(
    "ruby",
    ["-e", 'require "ffi-rzmq"; require "msgpack"; print RbConfig.ruby'],
    60_000,
  );
  if (probe.code !== 0 || probe.stdout === "")
    return { ok: false, reason: `ruby cannot load ffi-rzmq and msgpack:\n${tail(probe.output)}`, install };
  return { ok: true, command: probe.stdout };
}

/** CI=1 / CI=true (as CI services set it); CI=0, CI=false or empty do not count. */
function underCI(): boolean {
  const ci = (process.env.CI ?? "").trim().toLowerCase();
  return ci !== "" && ci !== "0" && ci !== "false";
}

const cache = new Map<string, Promise<Availability>>();
const announced = new Set<string>();

async function ensure(
  language: string,
  ctx: Mocha.Context,
  setUp: () => Promise<Availability>,
): Promise<string> {
  let pending = cache.get(language);
  if (pending === undefined) {
    pending = setUp();
    cache.set(language, pending);
  }
  const got = await pending;
  if (got.ok) return got.command;
  const message = `${language} is not available, so the ${language} tests cannot run.\n${got.reason}\nInstall: ${got.install}`;
  if (underCI())
    throw new Error(`${message}\n(CI is set: a missing interpreter fails the run instead of skipping it)`);
  if (!announced.has(language)) {
    announced.add(language);
    const bar = "!".repeat(78);
    process.stderr.write(
      `\n${bar}\n!! SKIPPING ${language.toUpperCase()} TESTS: ${message.replace(/\n/g, "\n!! ")}\n${bar}\n\n`,
    );
  } else {
    process.stderr.write(
      `!! skipping "${ctx.test?.parent?.fullTitle() ?? language}": ${language} is not available (see above)\n`,
    );
  }
  ctx.skip();
}

/**
 * The venv python with handlers-python[test] installed (scripts/setup-python.sh,
 * idempotent). Call from a hook or test with its mocha context: skips it (or,
 * under CI, fails it) when Python cannot be set up.
 */
export function ensurePython(ctx: Mocha.Context): Promise<string> {
  ctx.timeout(Math.max(ctx.timeout(), SETUP_TIMEOUT_MS + 10_000));
  return ensure("Python", ctx, setUpPython);
}

/**
 * The ruby interpreter, with ffi-rzmq and msgpack (scripts/setup-ruby.sh
 * installs them with apt-get when run as root). Skips (or, under CI, fails) the
 * caller when Ruby cannot be had.
 */
export function ensureRuby(ctx: Mocha.Context): Promise<string> {
  ctx.timeout(Math.max(ctx.timeout(), SETUP_TIMEOUT_MS + 10_000));
  return ensure("Ruby", ctx, setUpRuby);
}

/**
 * The Python SDK's test pool, as arguments for spawnPool after the venv python.
 * `stateDir` (made if missing) replaces the temp dir it would otherwise create
 * and, when killed with SIGKILL, leave behind: give it one under the test's tmp.
 */
export function pythonTestPoolArgs(endpoint: string, stateDir: string, args: string[]): string[] {
  return ["-m", "stepbroker_handlers.testpool", "--endpoint", endpoint, "--state-dir", stateDir, ...args];
}

/** The Ruby SDK's test pool, as arguments for spawnPool after ruby. */
export function rubyTestPoolArgs(endpoint: string, args: string[]): string[] {
  return [join(ROOT, "handlers-ruby", "bin", "stepbroker-testpool"), "--endpoint", endpoint, ...args];
}

/** The repository root, for running the SDKs' own suites from it. */
export const REPO_ROOT = ROOT;

export interface SuiteRun {
  code: number | null;
  signal: NodeJS.Signals | null;
  timedOut: boolean;
  output: string;
}

/**
 * Runs a test suite as a child process in its own process group, from the
 * repository root, killing the whole group (the suite's own child processes
 * too) when it outlives `timeoutMs`. Keeps the last 64 KiB of its output.
 */
export function runSuite(
  cmd: string,
  args: string[],
  timeoutMs: number,
  env: NodeJS.ProcessEnv = {},
): Promise<SuiteRun> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      cwd: ROOT,
      detached: true,
      stdio: ["ignore", "pipe", "pipe"],
      env: { ...process.env, ...env },
    });
    let output = "";
    const keep = (d: Buffer): void => {
      output = (output + d.toString()).slice(-65_536);
    };
    child.stdout!.on("data", keep);
    child.stderr!.on("data", keep);
    let timedOut = false;
    const killGroup = (): void => {
      try {
        process.kill(-child.pid!, "SIGKILL");
      } catch {
        // already gone
      }
    };
    const timer = setTimeout(() => {
      timedOut = true;
      killGroup();
    }, timeoutMs);
    child.once("error", (e) => {
      clearTimeout(timer);
      reject(new Error(`could not start ${cmd}`, { cause: e }));
    });
    child.once("close", (code, signal) => {
      clearTimeout(timer);
      killGroup(); // anything the suite left running in its group
      resolve({ code, signal, timedOut, output });
    });
  });
}

/** A failure message with the suite's last lines, for assert messages. */
export function describeRun(what: string, run: SuiteRun, lines = 60): string {
  const how = run.timedOut
    ? "timed out and was killed"
    : run.signal
      ? `died of ${run.signal}`
      : `exited with ${run.code}`;
  return `${what} ${how}; its last ${lines} lines:\n${tail(run.output, lines)}`;
}
