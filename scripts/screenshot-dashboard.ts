/**
 * Takes the README's dashboard screenshots: an embedded PostgreSQL in a temp
 * directory, a broker and a Node.js pool running the order-fulfilment demo,
 * and Debian's Chromium (scripts/setup-chromium.sh) headless on the dashboard.
 * Writes docs/dashboard-task.png (the demo order's task page, complete) and
 * docs/dashboard-pools.png (the pools page while a second order runs).
 *   npx tsx scripts/screenshot-dashboard.ts [--out docs]
 * Everything it starts is stopped and its temp directories removed, also on failure.
 */
import { spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { pino } from "pino";
import puppeteer, { type Browser } from "puppeteer-core";
import { parse as parseYaml } from "yaml";
import { Broker } from "../broker/Broker";
import { HttpAuth } from "../broker/http/HttpAuth";
import { type HttpSide, serveHttp } from "../broker/http/serveHttp";
import { StateManager } from "../broker/state/StateManager";
import { DEMO_ORDER, registerOrderHandlers } from "../examples/order-fulfilment/handlers";
import { HandlerPool } from "../handlers-node";

const ROOT = join(import.meta.dirname, "..");
const { values } = parseArgs({ options: { out: { type: "string" } } });
const OUT = values.out ?? join(ROOT, "docs");
const say = (line: string) => process.stderr.write(`screenshot: ${line}\n`);

function chromiumPath(): string {
  const setup = spawnSync("sh", [join(ROOT, "scripts", "setup-chromium.sh")], { encoding: "utf8" });
  const path = setup.stdout?.trim().split("\n").pop() ?? "";
  if (setup.status !== 0 || !path.startsWith("/"))
    throw new Error(
      `no Chromium (scripts/setup-chromium.sh exited ${setup.status}); install it with "sudo apt-get install -y chromium" or set STEPBROKER_CHROMIUM`,
    );
  return path;
}

async function main(): Promise<void> {
  const chromium = chromiumPath();
  const quiet = pino({ level: process.env.STEPBROKER_LOG_LEVEL ?? "warn" });
  const tmp = mkdtempSync(join(tmpdir(), "sb-screenshot-"));
  const endpoint = "inproc://stepbroker-screenshot";
  let sm: StateManager | undefined;
  let broker: Broker | undefined;
  let pool: HandlerPool | undefined;
  let http: HttpSide | undefined;
  let browser: Browser | undefined;
  try {
    say("starting an embedded PostgreSQL, a broker and a pool…");
    sm = await StateManager.open({ dataDir: join(tmp, "pgdata"), logger: quiet });
    await sm.registerTemplate(
      parseYaml(readFileSync(join(ROOT, "examples", "order-fulfilment", "template.yaml"), "utf8")),
    );
    broker = new Broker({ endpoints: [endpoint], state: sm, brokerId: "demo", logger: quiet });
    await broker.start();
    pool = new HandlerPool({ endpoint, capacity: 4, poolId: "demo-pool", logger: quiet });
    registerOrderHandlers(pool);
    await pool.start();
    http = await serveHttp({
      broker,
      state: sm,
      logger: quiet,
      listen: "127.0.0.1:0",
      auth: new HttpAuth(undefined),
    });
    if (!http) throw new Error("the HTTP server did not start");

    const template = { namespace: "shop", name: "order_fulfilment" };
    const { task } = await broker.submit({ ...template, context: { ...DEMO_ORDER } });
    const done = await broker.wait(task.task_id, 30_000);
    if (done?.task.state !== "complete") throw new Error(`the demo task ended ${done?.task.state}`);

    browser = await puppeteer.launch({
      executablePath: chromium,
      headless: true,
      userDataDir: join(tmp, "chromium"),
      args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"],
      protocolTimeout: 30_000,
    });
    const page = await browser.newPage();
    await page.setViewport({ width: 1280, height: 900 });
    mkdirSync(OUT, { recursive: true });

    await page.goto(`${http.server.url}#/task/${task.task_id}`, { waitUntil: "load" });
    await page.waitForFunction(
      () => document.querySelector("#task h1 .badge")?.getAttribute("data-state") === "complete",
      { timeout: 15_000 },
    );
    await page.waitForSelector("svg.dag g.step", { timeout: 10_000 });
    const taskPng = join(OUT, "dashboard-task.png");
    await page.screenshot({ path: taskPng });

    // a second order in flight, so the pools page shows work being done
    await broker.submit({ ...template, context: { ...DEMO_ORDER, order_id: "ORD-2025-004212" } });
    await page.goto(`${http.server.url}#/pools`, { waitUntil: "load" });
    await page.waitForFunction(() => document.body.textContent?.includes("demo-pool") ?? false, {
      timeout: 15_000,
    });
    const poolsPng = join(OUT, "dashboard-pools.png");
    // the table is short: the empty page below it says nothing
    const height = await page.evaluate(() =>
      Math.ceil(document.querySelector("table")?.getBoundingClientRect().bottom ?? 300),
    );
    await page.screenshot({
      path: poolsPng,
      clip: { x: 0, y: 0, width: 1280, height: Math.min(900, height + 24) },
    });
    for (const f of [taskPng, poolsPng]) say(`wrote ${f} (${Math.round(statSync(f).size / 1024)} KiB)`);
  } finally {
    if (browser) {
      const proc = browser.process();
      await Promise.race([browser.close(), new Promise((r) => setTimeout(r, 10_000))]);
      if (proc && proc.exitCode === null && proc.signalCode === null) proc.kill("SIGKILL");
    }
    await http?.stop();
    await pool?.close({ drainMs: 1000 });
    await broker?.stop({ drainMs: 1000 });
    await sm?.close();
    rmSync(tmp, { recursive: true, force: true });
  }
}

try {
  await main();
  process.exit(0);
} catch (e) {
  say(`failed: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`);
  process.exit(1);
}
