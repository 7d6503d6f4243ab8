/**
 * Starts the HTTP side beside a started broker: its metrics (scrape-time
 * gauges read the broker's pools and the queue-depth query) and the server.
 * Used by `stepbroker start`, the demo and the tests, so all three compose it
 * the same way.
 */
import type { Logger } from "../db/logger";
import { BrokerMetrics } from "../metrics/BrokerMetrics";
import type { StateManager } from "../state/StateManager";
import { HttpAuth } from "./HttpAuth";
import { type BrokerView, HttpServer, type HttpServerOptions } from "./HttpServer";

export interface ServeHttpOptions {
  broker: BrokerView;
  state: StateManager;
  logger: Logger;
  listen: string;
  auth?: HttpAuth;
  insecure?: boolean;
  /** false: the address is only the default, so a busy port turns the dashboard off with a warning instead of failing. */
  explicit?: boolean;
  running?: () => boolean;
  /** Extra server options (tests: live interval, body limit). */
  server?: Partial<HttpServerOptions>;
}

export interface HttpSide {
  server: HttpServer;
  metrics: BrokerMetrics;
  stop(): Promise<void>;
}

export async function serveHttp(options: ServeHttpOptions): Promise<HttpSide | undefined> {
  const metrics = new BrokerMetrics({
    sources: { pools: () => options.broker.listPools(), queueDepth: () => options.state.queueDepth() },
  });
  const server = new HttpServer({
    listen: options.listen,
    broker: options.broker,
    state: options.state,
    logger: options.logger,
    metrics,
    auth: options.auth ?? new HttpAuth(undefined),
    ...(options.insecure ? { insecure: true } : {}),
    ...(options.running ? { running: options.running } : {}),
    ...options.server,
  });
  try {
    await server.start();
  } catch (e) {
    const code = ((e as Error).cause as NodeJS.ErrnoException | undefined)?.code;
    if (options.explicit === false && code === "EADDRINUSE") {
      options.logger.warn(
        { listen: options.listen },
        `the dashboard is off: ${options.listen} is in use; choose another address with --http or STEPBROKER_HTTP, or pass --no-http`,
      );
      return undefined;
    }
    throw e;
  }
  // The broker reports claims, sends, commits and faults to the metrics from now on.
  options.broker.observe?.(metrics);
  return { server, metrics, stop: () => server.stop() };
}
