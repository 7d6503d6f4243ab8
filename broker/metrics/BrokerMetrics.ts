/**
 * The broker's Prometheus metrics: one prom-client Registry per broker (so
 * tests and several brokers in one process never share counters), small typed
 * methods the broker services call at the events they count, and gauges read
 * at scrape time from the pool registry and one cheap query.
 *
 * Labels are handler and pool names only, never task, step or attempt ids, and
 * each label keeps at most `maxLabelValues` distinct values (later ones fold
 * into "other"): a pool fleet that restarts with fresh ids all day must not
 * grow the scrape without bound.
 *
 * The broker reports to it once observed (serveHttp calls Broker.observe):
 * claims and sends in dispatch/Dispatcher, commits, outcomes and retries in
 * completion/, timeouts in maintenance/, lost attempts in pools/, refused
 * messages in transport/PeerGuard and BrokerContext.sendError.
 */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from "prom-client";
import type { PoolView } from "../../protocol";
import type { QueueDepthRow } from "../state/DashboardReads";
import type { AttemptOutcome, MetricsSink } from "./MetricsSink";

/** What the scrape-time gauges read. Both are optional so the metrics can be built before the broker. */
export interface MetricsSources {
  /** The pools connected now (Broker.listPools). */
  pools?: () => readonly (PoolView & { pool_id: string; credit?: number; draining?: boolean })[];
  /** Ready steps per handler (StateManager.queueDepth). */
  queueDepth?: () => Promise<QueueDepthRow[]>;
}

export interface BrokerMetricsOptions {
  sources?: MetricsSources;
  /** Distinct values kept per label before folding into "other" (default 500). */
  maxLabelValues?: number;
  /** Process metrics (CPU, memory, event loop lag, GC); default on. */
  processMetrics?: boolean;
  /** Longest a scrape waits for the queue-depth query (default 2000 ms); then the gauges are left out. */
  queueDepthTimeoutMs?: number;
}

export type { AttemptOutcome } from "./MetricsSink";

export const OTHER_LABEL = "other";

/** Handler and pool pairs whose series are kept bound (see BrokerMetrics.children). */
const SERIES_CACHE = 10_000;

interface SeriesOf {
  handler: string;
  pool: string;
  dispatched: { inc(n?: number): void };
  completed: { inc(n?: number): void };
  failed: { inc(n?: number): void };
  timedOut: { inc(n?: number): void };
  retried: { inc(n?: number): void };
  duration: { observe(v: number): void };
}

/** The first `max` distinct values of a label pass; the rest become "other". */
class LabelCap {
  private readonly seen = new Set<string>();
  constructor(private readonly max: number) {}
  of(value: string): string {
    const v = value === "" ? "unknown" : value;
    if (this.seen.has(v)) return v;
    if (this.seen.size >= this.max) return OTHER_LABEL;
    this.seen.add(v);
    return v;
  }
}

const DURATION_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800];
const LATENCY_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5];
const BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096];

export class BrokerMetrics implements MetricsSink {
  readonly registry = new Registry();
  private readonly series = new Map<string, SeriesOf>();
  private readonly handlers: LabelCap;
  private readonly poolNames: LabelCap;
  private readonly codes: LabelCap;
  private readonly dispatched: Counter<"handler" | "pool">;
  private readonly completed: Counter<"handler" | "pool">;
  private readonly failed: Counter<"handler" | "pool">;
  private readonly retried: Counter<"handler" | "pool">;
  private readonly timedOut: Counter<"handler" | "pool">;
  private readonly abandoned: Counter<"handler" | "pool" | "outcome">;
  private readonly duration: Histogram<"handler">;
  private readonly batchSize: Histogram;
  private readonly commitLatency: Histogram;
  private readonly claimLatency: Histogram;
  private readonly awaiting: Gauge;
  private readonly faults: Counter<"code">;
  private readonly dbErrors: Counter;

  constructor(options: BrokerMetricsOptions = {}) {
    const max = options.maxLabelValues ?? 500;
    this.handlers = new LabelCap(max);
    this.poolNames = new LabelCap(max);
    this.codes = new LabelCap(max);
    const registers = [this.registry];
    const byHandlerPool = (name: string, help: string) =>
      new Counter({ name, help, labelNames: ["handler", "pool"] as const, registers });
    this.dispatched = byHandlerPool("stepbroker_steps_dispatched_total", "Attempts sent to a pool.");
    this.completed = byHandlerPool("stepbroker_steps_completed_total", "Attempts a handler completed.");
    this.failed = byHandlerPool("stepbroker_steps_failed_total", "Attempts a handler failed.");
    this.retried = byHandlerPool(
      "stepbroker_steps_retried_total",
      "Steps made ready again after a failed, timed out or lost attempt.",
    );
    this.timedOut = byHandlerPool(
      "stepbroker_steps_timed_out_total",
      "Attempts whose lease expired before a result arrived.",
    );
    this.abandoned = new Counter({
      name: "stepbroker_steps_abandoned_total",
      help: "Attempts that ended without a handler's result: lost (pool or broker gone), undelivered, cancelled.",
      labelNames: ["handler", "pool", "outcome"] as const,
      registers,
    });
    this.duration = new Histogram({
      name: "stepbroker_step_duration_seconds",
      help: "How long finished attempts ran, from send to result.",
      labelNames: ["handler"] as const,
      buckets: DURATION_BUCKETS,
      registers,
    });
    this.batchSize = new Histogram({
      name: "stepbroker_commit_batch_size",
      help: "Results stored per group commit.",
      buckets: BATCH_BUCKETS,
      registers,
    });
    this.commitLatency = new Histogram({
      name: "stepbroker_commit_latency_seconds",
      help: "How long a group commit's transaction took.",
      buckets: LATENCY_BUCKETS,
      registers,
    });
    this.claimLatency = new Histogram({
      name: "stepbroker_claim_latency_seconds",
      help: "How long a claim of ready steps took.",
      buckets: LATENCY_BUCKETS,
      registers,
    });
    this.awaiting = new Gauge({
      name: "stepbroker_results_awaiting_commit",
      help: "Results received and not yet stored.",
      registers,
    });
    this.faults = new Counter({
      name: "stepbroker_protocol_faults_total",
      help: "Messages refused, by protocol error code.",
      labelNames: ["code"] as const,
      registers,
    });
    this.dbErrors = new Counter({
      name: "stepbroker_db_connection_errors_total",
      help: "Database statements that failed for lack of a working connection.",
      registers,
    });
    this.poolGauges(options.sources?.pools);
    this.queueGauges(options.sources?.queueDepth, options.queueDepthTimeoutMs ?? 2000);
    if (options.processMetrics ?? true) collectDefaultMetrics({ register: this.registry });
  }

  // ------------------------------------------------------------ events the broker reports

  /** At send: `n` attempts of `handler` went to `pool`. */
  stepsDispatched(handler: string, pool: string, n = 1): void {
    this.children(handler, pool).dispatched.inc(n);
  }

  /** At commit (or expiry, loss, cancel): one attempt ended; `durationMs` when it ran. */
  attemptFinished(handler: string, pool: string, outcome: AttemptOutcome, durationMs?: number): void {
    const c = this.children(handler, pool);
    if (outcome === "complete") c.completed.inc();
    else if (outcome === "error") c.failed.inc();
    else if (outcome === "timeout") c.timedOut.inc();
    else this.abandoned.inc({ handler: c.handler, pool: c.pool, outcome });
    if (durationMs !== undefined && Number.isFinite(durationMs) && durationMs >= 0)
      c.duration.observe(durationMs / 1000);
  }

  /** When a step goes back to ready for another attempt. */
  stepsRetried(handler: string, pool: string, n = 1): void {
    this.children(handler, pool).retried.inc(n);
  }

  /**
   * The labelled series of one handler and pool, made once: prom-client
   * hashes a label object on every call, which costs microseconds per step
   * on the hot path; a child is bound to its labels already.
   */
  private children(handler: string, pool: string): SeriesOf {
    const key = `${handler}\u0000${pool}`;
    let c = this.series.get(key);
    if (c) return c;
    const labels = { handler: this.handlers.of(handler), pool: this.poolNames.of(pool) };
    c = {
      handler: labels.handler,
      pool: labels.pool,
      dispatched: this.dispatched.labels(labels),
      completed: this.completed.labels(labels),
      failed: this.failed.labels(labels),
      timedOut: this.timedOut.labels(labels),
      retried: this.retried.labels(labels),
      duration: this.duration.labels({ handler: labels.handler }),
    };
    // Bounded like the labels: past the cap, every new pair shares the "other" series (not cached).
    if (this.series.size < SERIES_CACHE) this.series.set(key, c);
    return c;
  }

  /** After a group commit stored `size` results in `ms`. */
  commitBatch(size: number, ms: number): void {
    this.batchSize.observe(size);
    this.commitLatency.observe(ms / 1000);
  }

  /** After a claim of ready steps took `ms`. */
  claim(ms: number): void {
    this.claimLatency.observe(ms / 1000);
  }

  /** Whenever the committer's queue changes (or on each tick): results received, not yet stored. */
  resultsAwaitingCommit(n: number): void {
    this.awaiting.set(n);
  }

  /** When a message is refused with a protocol error code. */
  protocolFault(code: string): void {
    this.faults.inc({ code: this.codes.of(code) });
  }

  /** When a statement fails for lack of a working database connection. */
  dbError(): void {
    this.dbErrors.inc();
  }

  // ------------------------------------------------------------ scrape

  get contentType(): string {
    return this.registry.contentType;
  }

  /** The Prometheus text exposition of every metric. */
  metrics(): Promise<string> {
    return this.registry.metrics();
  }

  private poolGauges(pools: MetricsSources["pools"]): void {
    if (!pools) return;
    const registers = [this.registry];
    // Registered first: prom-client reads metrics in registration order, so this
    // collect fills the per-pool gauges below before they are read in the same scrape.
    const perPool: Gauge<"pool">[] = [];
    new Gauge({
      name: "stepbroker_pools",
      help: "Pools connected now.",
      registers,
      collect() {
        const now = pools();
        const [inFlight, credit, heartbeat] = perPool as [Gauge<"pool">, Gauge<"pool">, Gauge<"pool">];
        inFlight.reset();
        credit.reset();
        heartbeat.reset();
        const byLabel = new Map<string, { inFlight: number; credit: number; age: number }>();
        for (const p of now) {
          const label = p.pool_id.length > 0 ? p.pool_id : "unknown";
          const key = byLabel.has(label) || byLabel.size < POOL_GAUGE_CAP ? label : OTHER_LABEL;
          const prev = byLabel.get(key) ?? { inFlight: 0, credit: 0, age: 0 };
          const free = p.credit ?? (p.draining ? 0 : Math.max(0, p.capacity - p.in_flight));
          byLabel.set(key, {
            inFlight: prev.inFlight + p.in_flight,
            credit: prev.credit + free,
            age: Math.max(prev.age, p.last_seen_ms_ago / 1000),
          });
        }
        for (const [pool, v] of byLabel) {
          inFlight.set({ pool }, v.inFlight);
          credit.set({ pool }, v.credit);
          heartbeat.set({ pool }, v.age);
        }
        this.set(now.length);
      },
    });
    for (const [name, help] of [
      ["stepbroker_pool_in_flight", "Attempts sent to the pool and not yet answered."],
      ["stepbroker_pool_credit", "Attempts the pool may still be sent now (0 while draining)."],
      ["stepbroker_pool_heartbeat_age_seconds", "Time since the broker last heard from the pool."],
    ] as const)
      perPool.push(new Gauge({ name, help, labelNames: ["pool"] as const, registers }));
  }

  private queueGauges(queueDepth: MetricsSources["queueDepth"], timeoutMs: number): void {
    if (!queueDepth) return;
    const registers = [this.registry];
    const countDbError = () => this.dbError();
    const handlers = this.handlers;
    /** This scrape's read: the ready gauge (registered first, so collected first) starts it, the age gauge awaits it. */
    let latest: Promise<Map<string, { ready: number; age: number }> | undefined> = Promise.resolve(undefined);
    const read = async () => {
      let timer: NodeJS.Timeout | undefined;
      try {
        const rows = await Promise.race([
          queueDepth(),
          new Promise<never>((_, reject) => {
            timer = setTimeout(() => reject(new Error("queue depth query timed out")), timeoutMs);
          }),
        ]);
        // handlers folded into "other" add up (ready) and keep the oldest (age)
        const byHandler = new Map<string, { ready: number; age: number }>();
        for (const r of rows) {
          const handler = handlers.of(r.handler);
          const prev = byHandler.get(handler) ?? { ready: 0, age: 0 };
          byHandler.set(handler, {
            ready: prev.ready + r.ready,
            age: Math.max(prev.age, r.oldestAgeSeconds),
          });
        }
        return byHandler;
      } catch {
        // a scrape must still answer while the database does not: the gauges are left out, the error counted
        countDbError();
        return undefined;
      } finally {
        clearTimeout(timer);
      }
    };
    new Gauge({
      name: "stepbroker_queue_ready_steps",
      help: "Steps ready to run and not yet sent, by handler.",
      labelNames: ["handler"] as const,
      registers,
      async collect() {
        latest = read();
        const rows = await latest;
        this.reset();
        for (const [handler, v] of rows ?? []) this.set({ handler }, v.ready);
      },
    });
    new Gauge({
      name: "stepbroker_queue_oldest_ready_age_seconds",
      help: "How long the oldest ready step of the handler has been runnable.",
      labelNames: ["handler"] as const,
      registers,
      async collect() {
        const rows = await latest;
        this.reset();
        for (const [handler, v] of rows ?? []) this.set({ handler }, v.age);
      },
    });
  }
}

/** Distinct pool labels on the scrape-time gauges (they are rebuilt on each scrape, so this bounds one scrape). */
const POOL_GAUGE_CAP = 500;
