/**
 * The pool's local leases, now on one timer (handlers-node/LeaseTimers.ts):
 * the timer list on its own (real timers, short leases), and a HandlerPool
 * against a FakeBroker, where a lease that passes aborts a running step with
 * "timeout", progress() renews it, a step still waiting for a slot is
 * dropped, and leases of several lengths each expire on time.
 */
import { strict as assert } from "node:assert";
import { pino } from "pino";
import { HandlerPool, StepAbortedError } from "../../handlers-node";
import { LeaseTimers, type LeaseLane, type Leased } from "../../handlers-node/LeaseTimers";
import type { ResultItem } from "../../protocol";
import { FakeBroker, sleep, stepFor, type Received } from "./support/fakeBroker";

class Item implements Leased {
  leaseDue = 0;
  leasePrev: Leased | undefined = undefined;
  leaseNext: Leased | undefined = undefined;
  leaseLane: LeaseLane | undefined = undefined;
  constructor(readonly name: string) {}
}

/** Timers this process holds now (the harness's own included: compared only within one synchronous stretch). */
const timers = (): number => process.getActiveResourcesInfo().filter((r) => r === "Timeout").length;

function results(r: Received): ResultItem[] {
  return (r.body as { results: ResultItem[] }).results;
}

describe("handlers-node LeaseTimers", function () {
  it("expires leases in due order across lengths, skips cleared ones and renews re-armed ones", async function () {
    const fired: { name: string; at: number }[] = [];
    const t0 = performance.now();
    const leases = new LeaseTimers<Item>((i) => fired.push({ name: i.name, at: performance.now() - t0 }));
    const [a, b, c, d, e] = ["a", "b", "c", "d", "e"].map((n) => new Item(n)) as [
      Item,
      Item,
      Item,
      Item,
      Item,
    ];
    leases.arm(a, 120);
    leases.arm(b, 40);
    leases.arm(c, 120);
    leases.arm(d, 40);
    leases.arm(e, 80);
    leases.clear(d);
    await sleep(20);
    leases.arm(a, 120); // renewed: now due after c
    const deadline = Date.now() + 3000;
    while (fired.length < 4 && Date.now() < deadline) await sleep(10);
    await sleep(60); // d, cleared, must not come late either
    assert.deepEqual(
      fired.map((f) => f.name),
      ["b", "e", "c", "a"],
    );
    const at = Object.fromEntries(fired.map((f) => [f.name, f.at]));
    assert.ok(at.b! >= 39, `b expired after ${at.b} ms, before its 40 ms lease`);
    assert.ok(at.e! >= 79, `e expired after ${at.e} ms`);
    assert.ok(at.c! >= 119, `c expired after ${at.c} ms`);
    assert.ok(at.a! >= 139, `a (re-armed at 20 ms) expired after ${at.a} ms`);
    assert.equal(a.leaseLane, undefined, "an expired lease is unlinked");
  });

  it("holds one Node timer for any number of leases, and none once they are cleared", async function () {
    const before = timers();
    const leases = new LeaseTimers<Item>(() => assert.fail("nothing should expire"));
    const items = Array.from({ length: 1000 }, (_, i) => new Item(String(i)));
    for (const [i, it] of items.entries()) leases.arm(it, 10_000 + (i % 3) * 1000);
    assert.equal(timers(), before + 1);
    assert.equal(leases.scheduled, true);
    for (const it of items) leases.clear(it);
    leases.clearAll();
    assert.equal(timers(), before, "clearAll leaves no timer behind");
    assert.equal(leases.scheduled, false);
    // a lease cleared before its timer fires leaves nothing to fire
    const one = new LeaseTimers<Item>(() => assert.fail("a cleared lease expired"));
    const x = new Item("x");
    one.arm(x, 20);
    one.clear(x);
    assert.equal(one.scheduled, true, "the timer stays set when a lease is cleared");
    await sleep(60);
    assert.equal(one.scheduled, false, "the timer, finding nothing due, is not set again");
  });
});

describe("handlers-node HandlerPool local leases", function () {
  let broker: FakeBroker;
  let pool: HandlerPool | undefined;

  beforeEach(async function () {
    broker = await FakeBroker.bind("tcp");
  });

  afterEach(async function () {
    await pool?.close({ drainMs: 0, ackTimeoutMs: 0 });
    pool = undefined;
    broker.close();
  });

  async function startPool(capacity: number, setup: (p: HandlerPool) => void): Promise<string> {
    pool = new HandlerPool({
      endpoint: broker.endpoint,
      capacity,
      logger: pino({ level: "silent" }),
      // generous liveness: the first HELLO this process decodes compiles every schema, which may take a while
      heartbeat: { intervalMs: 100, liveness: 30 },
      reconnect: { initialMs: 10, maxMs: 50 },
    });
    setup(pool);
    const started = pool.start();
    const hello = await broker.handshake();
    await started;
    return hello.identity;
  }

  it("aborts running steps whose leases pass, each after its own timeout, with code timeout", async function () {
    const aborted = new Map<string, { code: string | undefined; afterMs: number }>();
    const sentAt = new Map<string, number>();
    const id = await startPool(4, (p) =>
      p.handle("stuck", async (step, ctx) => {
        await new Promise<void>((resolve) =>
          ctx.signal.addEventListener("abort", () => resolve(), { once: true }),
        );
        const reason: unknown = ctx.signal.reason;
        aborted.set(step.attemptId, {
          code: reason instanceof StepAbortedError ? reason.code : undefined,
          afterMs: performance.now() - sentAt.get(step.attemptId)!,
        });
        throw reason;
      }),
    );
    const steps = [300, 100, 200].map((ms) => stepFor("stuck", { timeout_ms: ms }));
    for (const s of steps) sentAt.set(s.attempt_id, performance.now());
    await broker.send(id, "STEP", { steps });
    const got: ResultItem[] = [];
    while (got.length < 3) got.push(...results(await broker.next("RESULT", () => true, 5000)));
    assert.deepEqual(
      got.map((r) => r.attempt_id),
      [steps[1]!, steps[2]!, steps[0]!].map((s) => s.attempt_id),
      "the shortest lease passes first",
    );
    for (const s of steps) {
      const a = aborted.get(s.attempt_id)!;
      assert.equal(a.code, "timeout");
      assert.ok(
        a.afterMs >= s.timeout_ms - 5,
        `aborted ${a.afterMs} ms after the STEP, lease ${s.timeout_ms} ms`,
      );
    }
    assert.ok(got.every((r) => r.status === "error"));
  });

  it("renews the lease on progress(), so a step that reports keeps running past its timeout", async function () {
    let abortedAt: number | undefined;
    const id = await startPool(1, (p) =>
      p.handle("reporting", async (_step, ctx) => {
        ctx.signal.addEventListener("abort", () => (abortedAt = performance.now()), { once: true });
        const { progress } = ctx; // destructured: it stays bound to its attempt
        for (let i = 0; i < 8; i++) {
          await sleep(40);
          progress(i / 8);
        }
        return "done";
      }),
    );
    const s = stepFor("reporting", { timeout_ms: 150 });
    await broker.send(id, "STEP", { steps: [s] });
    const r = await broker.next("RESULT", () => true, 5000);
    assert.deepEqual(results(r), [
      {
        attempt_id: s.attempt_id,
        status: "complete",
        output: "done",
        duration_ms: results(r)[0]!.duration_ms,
      },
    ]);
    assert.equal(abortedAt, undefined, "320 ms of work with a 150 ms lease, renewed every 40 ms");
    assert.ok((await broker.next("PROGRESS")).body.progress, "progress was sent");
  });

  it("drops a step whose lease passes while it waits for a slot, and runs the next one", async function () {
    const ran: string[] = [];
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const id = await startPool(1, (p) =>
      p.handle("slow", async (step) => {
        ran.push(step.attemptId);
        if (ran.length === 1) await gate;
        return step.attemptId;
      }),
    );
    const first = stepFor("slow", { timeout_ms: 5000 });
    const starved = stepFor("slow", { timeout_ms: 80 });
    await broker.send(id, "STEP", { steps: [first, starved] });
    await sleep(200); // the queued one's lease passes meanwhile
    const later = stepFor("slow", { timeout_ms: 5000 });
    await broker.send(id, "STEP", { steps: [later] });
    release();
    const got: ResultItem[] = [];
    while (got.length < 2) got.push(...results(await broker.next("RESULT", () => true, 5000)));
    assert.deepEqual(
      got.map((r) => r.attempt_id),
      [first.attempt_id, later.attempt_id],
    );
    assert.deepEqual(ran, [first.attempt_id, later.attempt_id], "the starved step never ran");
  });
});
