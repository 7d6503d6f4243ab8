/**
 * The broker's HTTP side, composed beside the broker by whoever starts it:
 * health and readiness probes, Prometheus metrics, the JSON API the dashboard
 * reads, operators' actions, live updates by server-sent events, and the
 * dashboard's files. It reaches the broker only through its public API and
 * the database only through the StateManager.
 *
 * Safety: non-loopback addresses are refused without a token (or --insecure);
 * with a token, everything but the probes and the dashboard's static files
 * needs it. Without a token (loopback), a request must name a loopback Host
 * (DNS rebinding) and a POST must be application/json from the same origin
 * (cross-site forms cannot send that without a preflight we never answer).
 */
import type { MetricsSink } from "../metrics/MetricsSink";
import { type IncomingMessage, type Server, type ServerResponse, createServer } from "node:http";
import type { AddressInfo } from "node:net";
import type { PoolView, TaskView } from "../../protocol";
import type { Logger } from "../db/logger";
import type { BrokerMetrics } from "../metrics/BrokerMetrics";
import type { StateManager } from "../state/StateManager";
import { StateError } from "../state/errors";
import { HttpAuth } from "./HttpAuth";
import { HttpError } from "./HttpError";
import { LiveUpdates } from "./LiveUpdates";
import { readJsonBody } from "./readJsonBody";
import { StaticFiles } from "./StaticFiles";
import { type HttpAddress, formatHostPort, isLoopbackHost, parseHttpAddress } from "./HttpAddress";

/** The part of Broker the HTTP side uses (its public API). */
export interface BrokerView {
  readonly id: string;
  readonly endpoints: string[];
  listPools(): (PoolView & { pool_id: string })[];
  servedHandlers(): Set<string>;
  cancel(taskId: string): Promise<TaskView | null>;
  /** Where the broker reports what it does (Broker.observe); absent, only the scrape-time gauges move. */
  observe?(sink: MetricsSink): void;
}

export interface HttpServerOptions {
  /** "host:port" (port 0: any free port). */
  listen: string | HttpAddress;
  broker: BrokerView;
  state: StateManager;
  logger: Logger;
  metrics?: BrokerMetrics;
  /** Bearer token for the API, metrics and actions. */
  auth?: HttpAuth;
  /** Serve a non-loopback address without a token. */
  insecure?: boolean;
  /** Whether the broker is serving (readiness); default: it has bound endpoints. */
  running?: () => boolean;
  /** Largest request body accepted (default 1 MiB). */
  maxBodyBytes?: number;
  /** How often live clients get an update (default 1000 ms). */
  liveIntervalMs?: number;
  /** How often the queue depth is sampled for the overview's history (default 10 s; kept 15 minutes). */
  queueSampleMs?: number;
  /** The dashboard's files (default the repository's dashboard/). */
  staticDir?: string;
  /** How long /readyz waits for `select 1` (default 1000 ms). */
  readyTimeoutMs?: number;
}

const DEFAULT_STATIC = new URL("../../dashboard/", import.meta.url).pathname;
const TASK_STATES = new Set(["pending", "in_progress", "complete", "error", "cancelled"]);
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/** Checks the HTTP options before anything binds (the CLI reports a refusal as a bad option). */
export function checkHttpOptions(
  listen: string | HttpAddress,
  auth: HttpAuth | undefined,
  insecure: boolean,
): HttpAddress {
  const address = typeof listen === "string" ? parseHttpAddress(listen) : listen;
  if (!isLoopbackHost(address.host) && !auth?.enabled && !insecure)
    throw new Error(
      `refusing to serve HTTP on ${formatHostPort(address.host, address.port)} (not loopback) without a token: ` +
        "set --http-token-file FILE or STEPBROKER_HTTP_TOKEN, or pass --insecure",
    );
  return address;
}

export class HttpServer {
  private readonly opts: HttpServerOptions;
  private readonly address: HttpAddress;
  private readonly auth: HttpAuth;
  private readonly log: Logger;
  private readonly server: Server;
  private readonly files: StaticFiles;
  private readonly live: LiveUpdates;
  private port = 0;
  /** Ready steps over the last 15 minutes, oldest first (for the overview). */
  private readonly queueHistory: { at: string; ready: number }[] = [];
  private sampler: NodeJS.Timeout | undefined;

  constructor(options: HttpServerOptions) {
    this.opts = options;
    this.auth = options.auth ?? new HttpAuth(undefined);
    this.address = checkHttpOptions(options.listen, this.auth, options.insecure ?? false);
    this.log = options.logger;
    this.server = createServer((req, res) => void this.handle(req, res));
    // a slow client must not hold a socket for ever (SSE streams are exempt: they are written to)
    this.server.requestTimeout = 30_000;
    this.server.headersTimeout = 10_000;
    this.files = new StaticFiles(options.staticDir ?? DEFAULT_STATIC);
    this.live = new LiveUpdates(
      options.broker,
      options.state,
      options.liveIntervalMs ?? 1000,
      options.metrics,
    );
  }

  /** The base URL, e.g. http://127.0.0.1:8080/ (after start). */
  get url(): string {
    return `http://${formatHostPort(this.address.host, this.port)}/`;
  }

  async start(): Promise<void> {
    await new Promise<void>((resolve, reject) => {
      const onError = (e: NodeJS.ErrnoException) => {
        const hint =
          e.code === "EADDRINUSE"
            ? "another process uses this address; stop it, choose another with --http, or pass --no-http"
            : e.message;
        reject(
          new Error(`cannot serve HTTP on ${formatHostPort(this.address.host, this.address.port)}: ${hint}`, {
            cause: e,
          }),
        );
      };
      this.server.once("error", onError);
      this.server.listen(this.address.port, this.address.host, () => {
        this.server.off("error", onError);
        resolve();
      });
    });
    this.port = (this.server.address() as AddressInfo).port;
    const every = this.opts.queueSampleMs ?? 10_000;
    const keep = Math.ceil((15 * 60_000) / every);
    const sample = async () => {
      try {
        const ready = (await this.opts.state.queueDepth()).reduce((n, r) => n + r.ready, 0);
        this.queueHistory.push({ at: new Date().toISOString(), ready });
        if (this.queueHistory.length > keep) this.queueHistory.splice(0, this.queueHistory.length - keep);
      } catch {
        this.opts.metrics?.dbError();
      }
    };
    void sample();
    this.sampler = setInterval(() => void sample(), every);
    this.sampler.unref();
    this.log.info(
      { url: this.url, auth: this.auth.enabled },
      `dashboard and metrics on ${this.url}${this.auth.enabled ? " (token required)" : ""}`,
    );
  }

  async stop(): Promise<void> {
    clearInterval(this.sampler);
    this.live.close();
    if (!this.server.listening) return;
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    this.server.closeAllConnections();
    await closed;
  }

  // ------------------------------------------------------------ request handling

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? "/", "http://localhost");
    try {
      res.setHeader("X-Content-Type-Options", "nosniff");
      res.setHeader("Cache-Control", "no-store");
      await this.route(req, res, url);
    } catch (e) {
      const err =
        e instanceof HttpError
          ? e
          : e instanceof StateError
            ? new HttpError(
                /^no (task|step) /.test(e.message) || e.code === "unknown_task" ? 404 : 409,
                e.code,
                e.message,
              )
            : undefined;
      if (err === undefined) {
        this.log.error({ err: e, method: req.method, path: url.pathname }, "HTTP request failed");
        this.fail(
          res,
          new HttpError(500, "internal", "the broker could not answer; see its log for the cause"),
        );
      } else {
        this.fail(res, err);
      }
    }
  }

  private async route(req: IncomingMessage, res: ServerResponse, url: URL): Promise<void> {
    const path = url.pathname;
    const method = req.method ?? "GET";
    if (path === "/healthz" && method === "GET")
      return this.json(res, 200, { status: "ok", broker_id: this.opts.broker.id });
    if (path === "/readyz" && method === "GET") return this.ready(res);
    this.checkHost(req);
    if (method === "GET" && !path.startsWith("/api/") && path !== "/metrics")
      return this.files.serve(res, path);
    if (!this.auth.allows(req.headers.authorization))
      throw new HttpError(
        401,
        "unauthorized",
        req.headers.authorization === undefined
          ? "this server needs its token: send Authorization: Bearer <token> (open the dashboard as /#token=<token>)"
          : "the token does not match the broker's (--http-token-file / STEPBROKER_HTTP_TOKEN)",
      );
    if (path === "/metrics" && method === "GET") return this.metrics(res);
    if (method === "GET") return this.read(res, path, url.searchParams, req);
    if (method === "POST") return this.act(req, res, path);
    throw new HttpError(405, "method_not_allowed", `${method} is not served; use GET, or POST for actions`);
  }

  /** Without a token, a loopback server answers only requests that name a loopback host: a rebinding DNS name cannot reach it. */
  private checkHost(req: IncomingMessage): void {
    if (this.auth.enabled || !isLoopbackHost(this.address.host)) return;
    const host = (req.headers.host ?? "").replace(/:\d+$/, "").replace(/^\[(.*)\]$/, "$1");
    if (!isLoopbackHost(host))
      throw new HttpError(
        403,
        "forbidden_host",
        `Host ${JSON.stringify(req.headers.host ?? "")} is not loopback; open the dashboard as ${this.url}`,
      );
  }

  private async ready(res: ServerResponse): Promise<void> {
    const problems: string[] = [];
    let database = "ok";
    try {
      await this.opts.state.ping(this.opts.readyTimeoutMs ?? 1000);
    } catch (e) {
      this.opts.metrics?.dbError();
      database = (e as Error).message;
      problems.push(`database: ${database}`);
    }
    const endpoints = this.opts.broker.endpoints;
    const running = this.opts.running ? this.opts.running() : endpoints.length > 0;
    if (!running) problems.push("broker: not serving (starting or stopping)");
    const body = {
      status: problems.length ? "not_ready" : "ready",
      database,
      broker: running ? "running" : "stopped",
      endpoints,
      problems,
    };
    this.json(res, problems.length ? 503 : 200, body);
  }

  private async metrics(res: ServerResponse): Promise<void> {
    const m = this.opts.metrics;
    if (!m) throw new HttpError(404, "metrics_off", "this broker was started without metrics");
    const text = await m.metrics();
    res.writeHead(200, { "Content-Type": m.contentType });
    res.end(text);
  }

  private async read(
    res: ServerResponse,
    path: string,
    q: URLSearchParams,
    req: IncomingMessage,
  ): Promise<void> {
    const { state, broker } = this.opts;
    if (path === "/api/tasks") {
      const s = q.get("state") || undefined;
      if (s !== undefined && !TASK_STATES.has(s))
        throw new HttpError(
          400,
          "bad_filter",
          `state must be one of ${[...TASK_STATES].join(", ")}, not ${JSON.stringify(s)}`,
        );
      const before = q.get("before") || undefined;
      if (before !== undefined && !UUID.test(before))
        throw new HttpError(400, "bad_filter", "before must be a task id (the previous page's next)");
      const limit = intParam(q, "limit", 50, 1, 500);
      const text = q.get("text") || undefined;
      if (text !== undefined && text.length > 200)
        throw new HttpError(400, "bad_filter", "text is longer than 200 characters");
      const template = q.get("template") || undefined;
      const page = await state.listTasks({
        ...(s ? { state: s as TaskView["state"] } : {}),
        ...(template ? { template } : {}),
        ...(text ? { text } : {}),
        ...(before ? { before } : {}),
        limit,
      });
      return this.json(res, 200, page);
    }
    const one = /^\/api\/tasks\/([^/]+)$/.exec(path);
    if (one) return this.json(res, 200, await this.taskDetail(uuidParam(one[1]!, "task")));
    if (path === "/api/pools") {
      const pools = broker.listPools().map((p) => {
        const extra = p as { credit?: number; draining?: boolean; quarantined?: boolean };
        return {
          ...p,
          credit: extra.credit ?? (extra.draining ? 0 : Math.max(0, p.capacity - p.in_flight)),
          draining: extra.draining ?? null,
          quarantined: extra.quarantined ?? null,
        };
      });
      return this.json(res, 200, { pools });
    }
    if (path === "/api/templates") return this.json(res, 200, { templates: await state.listTemplates() });
    if (path === "/api/throughput") {
      const minutes = intParam(q, "minutes", 15, 1, 120);
      const [rows, queue] = await Promise.all([state.throughput(minutes), state.queueDepth()]);
      return this.json(res, 200, { minutes, throughput: rows, queue, queue_history: this.queueHistory });
    }
    if (path === "/api/events") return this.live.open(req, res);
    throw new HttpError(
      404,
      "not_found",
      `no such API route ${path}; see README.md, "Dashboard and metrics"`,
    );
  }

  private async taskDetail(taskId: string): Promise<unknown> {
    const { state, broker } = this.opts;
    const task = await state.getTask(taskId, { includeSteps: true });
    if (!task) throw new HttpError(404, "unknown_task", `no task ${taskId}; check the id`);
    const [attempts, transitions, explain] = await Promise.all([
      state.getAttempts(taskId),
      state.getTransitions(taskId),
      state.explain(taskId, { servedHandlers: broker.servedHandlers() }),
    ]);
    const edges = (task.steps ?? []).flatMap((s) => s.depends_on.map((p) => ({ from: p, to: s.name })));
    return { task, edges, attempts, transitions, explain };
  }

  private async act(req: IncomingMessage, res: ServerResponse, path: string): Promise<void> {
    const type = (req.headers["content-type"] ?? "").split(";")[0]!.trim().toLowerCase();
    if (type !== "application/json")
      throw new HttpError(
        415,
        "json_only",
        "actions take a JSON body: send Content-Type: application/json (an empty body is {})",
      );
    const origin = req.headers.origin;
    if (origin !== undefined && origin !== "null") {
      let originHost: string;
      try {
        originHost = new URL(origin).host;
      } catch {
        originHost = "";
      }
      if (originHost !== req.headers.host)
        throw new HttpError(403, "cross_origin", "actions are taken only from the dashboard's own origin");
    }
    const body = await readJsonBody(req, this.opts.maxBodyBytes ?? 1024 * 1024);
    const { state, broker } = this.opts;
    let m = /^\/api\/tasks\/([^/]+)\/cancel$/.exec(path);
    if (m) {
      const taskId = uuidParam(m[1]!, "task");
      const task = await broker.cancel(taskId);
      if (!task) throw new HttpError(404, "unknown_task", `no task ${taskId}; check the id`);
      this.log.info({ task_id: taskId, state: task.state }, `HTTP: cancelled task ${taskId}`);
      return this.json(res, 200, { task });
    }
    m = /^\/api\/steps\/([^/]+)\/retry$/.exec(path);
    if (m) {
      const stepId = uuidParam(m[1]!, "step");
      const out = await state.retry({ stepId });
      this.log.info({ step_id: stepId }, `HTTP: retried step ${stepId}`);
      return this.json(res, 200, out);
    }
    m = /^\/api\/steps\/([^/]+)\/resolve$/.exec(path);
    if (m) {
      const stepId = uuidParam(m[1]!, "step");
      if (body === null || typeof body !== "object" || Array.isArray(body))
        throw new HttpError(400, "bad_body", 'the body must be a JSON object, e.g. {"output": {"ok": true}}');
      const output = (body as { output?: unknown }).output;
      if (output !== undefined && JSON.stringify(output).includes("\\u0000"))
        throw new HttpError(
          400,
          "bad_output",
          "the output contains U+0000, which PostgreSQL cannot store; remove it",
        );
      const out = await state.resolveStep(stepId, output as Parameters<StateManager["resolveStep"]>[1]);
      this.log.info({ step_id: stepId }, `HTTP: resolved step ${stepId} by hand`);
      return this.json(res, 200, out);
    }
    throw new HttpError(
      404,
      "not_found",
      `no such action ${path}; actions are POST /api/tasks/<id>/cancel, /api/steps/<id>/retry, /api/steps/<id>/resolve`,
    );
  }

  /** The JSON body, at most maxBodyBytes; an empty body is {}. */
  // ------------------------------------------------------------ files and answers

  private json(res: ServerResponse, status: number, body: unknown): void {
    res.writeHead(status, { "Content-Type": "application/json; charset=utf-8" });
    res.end(JSON.stringify(body));
  }

  private fail(res: ServerResponse, err: HttpError): void {
    if (res.headersSent) {
      res.end();
      return;
    }
    const headers: Record<string, string> = { "Content-Type": "application/json; charset=utf-8" };
    if (err.status === 401) headers["WWW-Authenticate"] = 'Bearer realm="stepbroker"';
    if (err.status === 413) headers.Connection = "close";
    res.writeHead(err.status, headers);
    res.end(JSON.stringify({ error: { code: err.code, message: err.message } }));
  }
}

function intParam(q: URLSearchParams, name: string, dflt: number, min: number, max: number): number {
  const v = q.get(name);
  if (v === null || v === "") return dflt;
  const n = Number(v);
  if (!Number.isInteger(n) || n < min || n > max)
    throw new HttpError(
      400,
      "bad_filter",
      `${name} must be an integer from ${min} to ${max}, not ${JSON.stringify(v)}`,
    );
  return n;
}

function uuidParam(v: string, what: "task" | "step"): string {
  let id: string;
  try {
    id = decodeURIComponent(v);
  } catch {
    id = v;
  }
  if (!UUID.test(id))
    throw new HttpError(400, `bad_${what}_id`, `${JSON.stringify(id)} is not a ${what} id (a UUID)`);
  return id;
}
