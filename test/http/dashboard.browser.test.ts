/**
 * The dashboard in a real browser: Debian's Chromium, headless, driven by
 * puppeteer-core, against a real broker, a real pool and PostgreSQL. It
 * watches a diamond task go from running to complete without a reload, checks
 * the DAG it draws, and cancels a second task from the page.
 *
 * Needs Chromium (`scripts/setup-chromium.sh` installs it as root with
 * apt-get; CI runs it). Elsewhere, when it cannot be installed, the suite says
 * what is missing and skips. Screenshots go to test-artifacts/dashboard/
 * (STEPBROKER_ARTIFACTS overrides; not committed).
 */
import { strict as assert } from "node:assert";
import { spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import puppeteer, { type Browser, type Page } from "puppeteer-core";
import type { HttpSide } from "../../broker/http/serveHttp";
import { HandlerPool } from "../../handlers-node";
import { eventually, silent, useBrokerStack } from "../support/stack";
import { startHttp } from "./support";

const ROOT = join(import.meta.dirname, "..", "..");
const ARTIFACTS = process.env.STEPBROKER_ARTIFACTS ?? join(ROOT, "test-artifacts", "dashboard");
const STEP_MS = 700;

const DIAMOND = {
  namespace: "web",
  name: "slow_diamond",
  version: "1",
  steps: [
    { name: "a", handler: "slow" },
    { name: "b", handler: "slow", depends_on: ["a"] },
    { name: "c", handler: "slow", depends_on: ["a"] },
    { name: "d", handler: "slow", depends_on: ["b", "c"] },
  ],
};
const HELD = { namespace: "web", name: "held", version: "1", steps: [{ name: "hold", handler: "hold" }] };

function findChromium(this: Mocha.Context): string {
  const setup = spawnSync("sh", [join(ROOT, "scripts", "setup-chromium.sh")], {
    encoding: "utf8",
    timeout: 280_000,
  });
  const path = setup.stdout?.trim().split("\n").pop() ?? "";
  if (setup.status === 0 && path.startsWith("/")) return path;
  const why =
    `Chromium is not available (scripts/setup-chromium.sh exited ${setup.status ?? setup.signal}): ` +
    `install it with "sudo apt-get install -y chromium" (or run scripts/setup-chromium.sh as root), ` +
    `or point STEPBROKER_CHROMIUM at a Chromium binary.\n${setup.stderr ?? ""}`;
  if (process.env.CI) throw new Error(why);
  process.stderr.write(`skipping the dashboard browser tests: ${why}\n`);
  this.skip();
}

describe("the dashboard in headless Chromium", function () {
  this.timeout(90_000);
  const stack = useBrokerStack("dashboard", "inproc");
  let chromium = "";
  let browser: Browser | undefined;
  let page: Page;
  let http: HttpSide;
  let pool: HandlerPool;
  let profile = "";
  const pageErrors: string[] = [];

  before(async function () {
    this.timeout(300_000);
    chromium = findChromium.call(this);
    await stack.registerTemplate(DIAMOND);
    await stack.registerTemplate(HELD);
    pool = new HandlerPool({ endpoint: stack.endpoint, capacity: 4, poolId: "browser-pool", logger: silent });
    pool.handle("slow", async (step, ctx) => {
      await new Promise((r) => {
        const t = setTimeout(r, STEP_MS);
        ctx.signal.addEventListener("abort", () => (clearTimeout(t), r(undefined)));
      });
      return { step: step.stepName, inputs: Object.keys(step.inputs as object) };
    });
    // holds its step until the task is cancelled (the broker's CANCEL aborts the signal)
    pool.handle(
      "hold",
      (_step, ctx) => new Promise((r) => ctx.signal.addEventListener("abort", () => r(null))),
    );
    await pool.start();
    http = await startHttp(stack, { server: { liveIntervalMs: 300 } });
    mkdirSync(ARTIFACTS, { recursive: true });
    profile = mkdtempSync(join(tmpdir(), "sb-chromium-"));
    browser = await puppeteer.launch({
      executablePath: chromium,
      headless: true,
      userDataDir: profile,
      // root in CI and containers: Chromium's sandbox needs user namespaces it may not have
      args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"],
      protocolTimeout: 30_000,
    });
    page = await browser.newPage();
    await page.setViewport({ width: 1280, height: 900 });
    page.on("pageerror", (e) => pageErrors.push(String(e)));
    page.on("dialog", (d) => void d.accept());
  });

  after(async function () {
    this.timeout(30_000);
    if (browser) {
      const proc = browser.process();
      await Promise.race([browser.close(), new Promise((r) => setTimeout(r, 10_000))]);
      // a browser that did not close in time must not outlive the test
      if (proc && proc.exitCode === null && proc.signalCode === null) proc.kill("SIGKILL");
    }
    await http?.stop();
    await pool?.close({ drainMs: 1000 });
    if (profile) rmSync(profile, { recursive: true, force: true });
  });

  afterEach(async function () {
    if (this.currentTest?.state === "failed" && page) {
      await page.screenshot({ path: join(ARTIFACTS, `failed-${Date.now()}.png`) }).catch(() => undefined);
      if (pageErrors.length) process.stderr.write(`page errors:\n${pageErrors.join("\n")}\n`);
    }
  });

  const badgeState = () =>
    page.$eval("#task h1 .badge", (el) => el.getAttribute("data-state")).catch(() => null);

  it("watches a diamond task go from running to complete without a reload, and draws its DAG", async () => {
    const { task } = await stack.broker.submit({ namespace: "web", name: "slow_diamond", context: {} });
    await page.goto(`${http.server.url}#/task/${task.task_id}`, { waitUntil: "load" });
    await page.waitForSelector("#task h1 .badge", { timeout: 15_000 });
    // a mark on the window survives only if the page never reloads
    await page.evaluate(() => ((window as unknown as { sbMark: number }).sbMark = 42));
    const first = await badgeState();
    assert.ok(
      first === "pending" || first === "in_progress",
      `the task is still running when the page opens, not ${first}`,
    );
    await page.waitForSelector('svg.dag g.step[data-step="a"]', { timeout: 10_000 });
    await page.screenshot({ path: join(ARTIFACTS, "task-running.png") });
    // a step seen running in the DAG, then the whole task complete, all by live updates
    await page.waitForSelector('svg.dag g.step[data-state="in_progress"]', { timeout: 15_000 });
    await page.waitForFunction(
      () => document.querySelector("#task h1 .badge")?.getAttribute("data-state") === "complete",
      { timeout: 30_000, polling: 100 },
    );
    assert.equal(
      await page.evaluate(() => (window as unknown as { sbMark?: number }).sbMark),
      42,
      "no reload",
    );
    await page.waitForFunction(
      () => document.querySelectorAll('svg.dag g.step[data-state="complete"]').length === 4,
      { timeout: 10_000 },
    );
    const steps = await page.$$eval("svg.dag g.step", (gs) => gs.map((g) => g.getAttribute("data-step")));
    assert.deepEqual(steps.sort(), ["a", "b", "c", "d"]);
    const edges = await page.$$eval("svg.dag path[data-edge]", (ps) =>
      ps.map((p) => p.getAttribute("data-edge")),
    );
    assert.deepEqual(edges.sort(), ["a>b", "a>c", "b>d", "c>d"]);
    const attempts = await page.$$eval("#task table", (ts) => ts.map((t) => t.textContent ?? "").join("\n"));
    assert.match(attempts, /browser-pool/, "the attempts table names the pool");
    await page.screenshot({ path: join(ARTIFACTS, "task-complete.png"), fullPage: true });
    assert.deepEqual(pageErrors, []);
  });

  it("cancels a second task from the task list and its page; the database says cancelled", async () => {
    const { task } = await stack.broker.submit({
      namespace: "web",
      name: "held",
      context: { who: "browser" },
    });
    await eventually("the held step in flight", () =>
      stack.broker.listPools()[0]?.in_flight === 1 ? true : undefined,
    );
    await page.goto(`${http.server.url}#/tasks?template=web/held`, { waitUntil: "load" });
    // The page rebuilds its view on every live tick, so a handle taken in one
    // round trip may be gone by the next: find and click in one turn of the page's loop.
    const clickNow = (selector: string) =>
      page.waitForFunction(
        (sel: string) => {
          const el = document.querySelector<HTMLElement>(sel);
          el?.click();
          return el !== null;
        },
        { timeout: 10_000, polling: 100 },
        selector,
      );
    await clickNow(`tr[data-task="${task.task_id}"] a`);
    await page.waitForSelector('#task button[data-action="cancel-task"]', { timeout: 10_000 });
    await clickNow('#task button[data-action="cancel-task"]');
    await page.waitForFunction(
      () => document.querySelector("#task h1 .badge")?.getAttribute("data-state") === "cancelled",
      { timeout: 15_000, polling: 100 },
    );
    const [row] = await stack.sql<{ state: string }>("select state from tasks where id = $1", [task.task_id]);
    assert.equal(row!.state, "cancelled");
    await eventually("the pool let the attempt go", () =>
      stack.broker.listPools()[0]?.in_flight === 0 ? true : undefined,
    );
    await page.screenshot({ path: join(ARTIFACTS, "task-cancelled.png"), fullPage: true });
  });

  it("shows the pool and the overview", async () => {
    await page.goto(`${http.server.url}#/pools`, { waitUntil: "load" });
    const cells = await page.waitForSelector('tr[data-pool="browser-pool"]', { timeout: 10_000 });
    const text = await cells!.evaluate((tr) => tr.textContent ?? "");
    assert.match(text, /slow/);
    await page.goto(`${http.server.url}#/`, { waitUntil: "load" });
    await page.waitForSelector('svg[data-testid="throughput"] rect.bar-complete', { timeout: 10_000 });
    await page.waitForSelector('polyline[data-testid="queue-history"]', { timeout: 10_000 });
    await page.screenshot({ path: join(ARTIFACTS, "overview.png") });
    assert.deepEqual(pageErrors, []);
  });
});
