/**
 * Live updates for the dashboard, by server-sent events: every open page
 * gets a small `tick` summary every interval and refetches what it shows.
 * The timer runs only while some page listens.
 */
import type { IncomingMessage, ServerResponse } from "node:http";
import type { MetricsSink } from "../metrics/MetricsSink";
import type { StateManager } from "../state/StateManager";
import { HttpError } from "./HttpError";
import type { BrokerView } from "./HttpServer";

const MAX_LIVE_CLIENTS = 64;

export class LiveUpdates {
  private readonly live = new Set<ServerResponse>();
  private liveTimer: NodeJS.Timeout | undefined;

  constructor(
    private readonly broker: BrokerView,
    private readonly state: StateManager,
    private readonly intervalMs: number,
    private readonly metrics: MetricsSink | undefined,
  ) {}

  /** Server-sent events: a `tick` with a small summary every liveIntervalMs; pages refetch what they show. */
  open(req: IncomingMessage, res: ServerResponse): void {
    if (this.live.size >= MAX_LIVE_CLIENTS)
      throw new HttpError(
        503,
        "too_many_live_clients",
        `at most ${MAX_LIVE_CLIENTS} live pages at once; close some, or reload later`,
      );
    req.socket.setTimeout(0);
    res.writeHead(200, {
      "Content-Type": "text/event-stream",
      "Cache-Control": "no-store",
      Connection: "keep-alive",
    });
    res.write("retry: 2000\n\n");
    this.live.add(res);
    res.on("close", () => {
      this.live.delete(res);
      if (this.live.size === 0) {
        clearInterval(this.liveTimer);
        this.liveTimer = undefined;
      }
    });
    if (this.liveTimer === undefined) {
      this.liveTimer = setInterval(() => void this.tick(), this.intervalMs);
      this.liveTimer.unref();
    }
    void this.tick(res);
  }

  private async tick(only?: ServerResponse): Promise<void> {
    let ready: number | null = null;
    try {
      ready = (await this.state.queueDepth()).reduce((n, r) => n + r.ready, 0);
    } catch {
      this.metrics?.dbError();
    }
    const pools = this.broker.listPools();
    const data = JSON.stringify({
      at: new Date().toISOString(),
      pools: pools.length,
      in_flight: pools.reduce((n, p) => n + p.in_flight, 0),
      ready,
    });
    for (const res of only ? [only] : this.live) res.write(`event: tick\ndata: ${data}\n\n`);
  }

  /** Ends every stream (at stop). */
  close(): void {
    clearInterval(this.liveTimer);
    this.liveTimer = undefined;
    for (const res of this.live) res.end();
    this.live.clear();
  }
}
