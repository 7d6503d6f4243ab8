/**
 * stepbroker end to end with a Python pool and with a Ruby pool, measured the
 * way bench/stepbroker.ts measures the Node.js pool: one-step tasks (handler
 * `noop`) created up front with createTasks, then a broker (this process) and
 * one pool (a child process, the SDK's test pool, over tcp on loopback) run
 * them. Throughput counts steps whose results were committed, from the first
 * commit to the last. The Node.js figure is measured in the same run for
 * comparison (by bench/stepbroker.ts itself) unless --no-node.
 *
 *   node --import tsx bench/languages.ts [--tasks 20000] [--seconds 30]
 *        [--capacity 256] [--encoding json|msgpack] [--no-node] [--json]
 *
 * Uses DATABASE_URL, or an embedded PostgreSQL (default settings, as
 * `npm run bench`). Needs scripts/setup-python.sh and scripts/setup-ruby.sh to
 * have been run; a language that is not set up is reported and left out.
 */
import { spawnSync } from "node:child_process";
import os from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";
import {
  countCommits,
  createTasksInBatches,
  dropBenchSchema,
  openBenchDatabase,
  openBenchState,
  startBrokerAndPool,
} from "./harness";
import { measureStepbroker } from "./stepbroker";

const ROOT = path.join(import.meta.dirname, "..");
const SCHEMA = "bench_languages";
const TEMPLATE = {
  namespace: "bench",
  name: "one",
  version: "1",
  steps: [{ name: "work", handler: "noop" }],
};

interface LanguageResult {
  language: string;
  encoding: string;
  capacity: number;
  tasks: number;
  steps: number;
  seconds: number;
  stepsPerSecond: number;
}

interface PoolCommand {
  language: string;
  cmd: string;
  args: (endpoint: string) => string[];
}

/** One pool, one run: the same counting as measureStepbroker in bench/stepbroker.ts. */
async function measureLanguage(opts: {
  databaseUrl: string;
  pool: PoolCommand;
  encoding: string;
  capacity: number;
  tasks: number;
  maxSeconds: number;
  log?: (line: string) => void;
}): Promise<LanguageResult> {
  const log = opts.log ?? (() => undefined);
  const sm = await openBenchState(opts.databaseUrl, SCHEMA);
  try {
    await sm.registerTemplate(TEMPLATE);
    log(`creating ${opts.tasks} one-step tasks up front…`);
    await createTasksInBatches(sm, opts.tasks, "bench", "one");
    const counter = countCommits(sm, opts.tasks);

    const run = await startBrokerAndPool(counter.state, {
      label: opts.pool.language,
      cmd: opts.pool.cmd,
      args: opts.pool.args,
      cwd: ROOT,
    });
    try {
      const timer = setTimeout(counter.finish, opts.maxSeconds * 1000);
      await counter.done;
      clearTimeout(timer);
    } finally {
      await run.stop();
    }
    return {
      language: opts.pool.language,
      encoding: opts.encoding,
      capacity: opts.capacity,
      tasks: opts.tasks,
      steps: counter.stored(),
      seconds: counter.seconds(),
      stepsPerSecond: counter.stepsPerSecond(),
    };
  } finally {
    await sm.close();
    await dropBenchSchema(opts.databaseUrl, SCHEMA);
  }
}

/** Whether `cmd args` exits 0 (a quick check that a language is set up). */
function works(cmd: string, args: string[]): boolean {
  return spawnSync(cmd, args, { cwd: ROOT, stdio: "ignore", timeout: 30_000 }).status === 0;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      tasks: { type: "string" },
      seconds: { type: "string" },
      capacity: { type: "string" },
      encoding: { type: "string" },
      "no-node": { type: "boolean" },
      json: { type: "boolean" },
    },
  });
  const tasks = Number(values.tasks ?? 20_000);
  const maxSeconds = Number(values.seconds ?? 30);
  const capacity = Number(values.capacity ?? 256);
  const encoding = values.encoding ?? "json";
  if (encoding !== "json" && encoding !== "msgpack") throw new Error("--encoding must be json or msgpack");
  const log = (line: string): void => void process.stderr.write(`bench: ${line}\n`);

  const python = path.join(ROOT, ".stepbroker", "venv", "bin", "python");
  const common = ["--handlers", "noop", "--capacity", String(capacity), "--encoding", encoding];
  const pools: PoolCommand[] = [];
  if (works(python, ["-c", "import stepbroker_handlers"])) {
    pools.push({
      language: "python",
      cmd: python,
      args: (e) => [
        "-m",
        "stepbroker_handlers.testpool",
        "--endpoint",
        e,
        ...common,
        "--pool-id",
        "bench-py",
      ],
    });
  } else log(`python: ${python} cannot import stepbroker_handlers; run scripts/setup-python.sh (left out)`);
  if (works("ruby", ["-e", 'require "ffi-rzmq"; require "msgpack"'])) {
    const bin = path.join(ROOT, "handlers-ruby", "bin", "stepbroker-testpool");
    pools.push({
      language: "ruby",
      cmd: "ruby",
      args: (e) => [bin, "--endpoint", e, ...common, "--pool-id", "bench-rb", "--log-level", "warn"],
    });
  } else log("ruby: ruby with ffi-rzmq and msgpack is missing; run scripts/setup-ruby.sh (left out)");

  const database = await openBenchDatabase(log);
  const url = database.url;
  try {
    const rows: [string, string, string, string][] = [["pool", "work", "steps/s", "notes"]];
    const results: LanguageResult[] = [];
    if (!values["no-node"]) {
      log(`node: ${tasks} one-step tasks (bench/stepbroker.ts)`);
      const node = await measureStepbroker({
        databaseUrl: url,
        shape: "one-step",
        tasks,
        capacity,
        maxSeconds,
        log,
      });
      rows.push([
        "node",
        `${node.steps} one-step tasks`,
        String(node.stepsPerSecond),
        `1 Node pool over tcp, capacity ${capacity}, json`,
      ]);
    }
    for (const pool of pools) {
      log(`${pool.language}: ${tasks} one-step tasks`);
      const r = await measureLanguage({ databaseUrl: url, pool, encoding, capacity, tasks, maxSeconds, log });
      results.push(r);
      const partial = r.steps < tasks ? `, stopped after ${maxSeconds} s` : "";
      rows.push([
        r.language,
        `${r.steps} one-step tasks`,
        String(r.stepsPerSecond),
        `1 ${r.language} pool over tcp, capacity ${capacity}, ${encoding}${partial}`,
      ]);
    }
    const widths = [0, 1, 2].map((i) => Math.max(...rows.map((r) => r[i]!.length)));
    process.stdout.write(
      `\n${rows.map((r) => r.map((c, i) => (i < 3 ? c.padEnd(widths[i]!) : c)).join("  ")).join("\n")}\n`,
    );
    if (values.json)
      process.stdout.write(JSON.stringify({ languages: results, cores: os.cpus().length }) + "\n");
  } finally {
    await database.close();
  }
}

await main();
