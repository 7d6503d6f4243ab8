/**
 * Dispatch: claims ready steps for the pools that have credit and sends them.
 * Anything that may mean work (a task created, a result that returned credit,
 * children readied, a retry's backoff ending, the poll) asks for a round with
 * `kick`. Up to DISPATCH_IN_FLIGHT rounds run at once, so work that appears
 * while a claim runs is claimed at once with the credit that claim left,
 * rather than after it. A claim sets its credit aside (PoolRegistry.reserve)
 * before it starts, so two claims never take the same credit; claim_steps
 * skips rows another claim holds, so they never take the same step. A pool
 * whose credit a claim in flight holds all of is owed a round: that claim may
 * have begun before the work appeared, so its round goes again. A message
 * that cannot be delivered means the pool is gone: its attempts go back.
 */
import { attemptTrace, BrokerCommands, coerceError, type StepDispatch } from "../../protocol";
import type { BrokerContext } from "../BrokerContext";
import { isDataError } from "../db/errors";
import { identityKey, type PoolRecord } from "../pools/PoolRegistry";
import type { ClaimedStep } from "../StatePort";

/**
 * The most a round claims for a pool whose last claim found no more ready
 * work, when nothing since said there may be more (a poll's round, or one
 * for another pool). A claim sets its whole limit aside until it returns, and
 * such a claim usually finds nothing: with all of a pool's credit set aside,
 * a result arriving meanwhile could claim none of its children in its commit,
 * and they waited for another round. A full probe means work was missed, and
 * the next round claims the rest at once.
 */
const PROBE_CLAIM = 16;

/**
 * Rounds in flight at most. A second lets new work skip the wait for the
 * claim already running; more would split the same credit into smaller
 * claims that contend for the same rows.
 */
export const DISPATCH_IN_FLIGHT = 2;

export class Dispatcher {
  private wanted = false;
  private readonly rounds = new Set<Promise<void>>();
  /** Claims in flight, by pool. */
  private readonly claiming = new Map<PoolRecord, number>();
  /** Pools a round could not claim for because a claim in flight held all their credit (see the header). */
  private readonly owed = new Set<PoolRecord>();
  private kickTimer: NodeJS.Timeout | undefined;
  private nextKickAt: number | undefined;

  /** `unreachable` forgets a pool whose connection is gone (PoolSessions.connectionLost). */
  constructor(
    private readonly ctx: BrokerContext,
    private readonly unreachable: (pool: PoolRecord, why: string) => void,
  ) {}

  /**
   * Asks for a dispatch round; a request while DISPATCH_IN_FLIGHT rounds run
   * has one of them go again. `creditOf` names a pool whose credit just came
   * back (a result arrived): if its last claim found less ready work than it
   * could take, that credit means no new work, and no round is started for it, so the
   * claim for the children a commit readies is not kept waiting behind an
   * empty one. Every other reason (new tasks, readied children, retries,
   * requeued attempts) may mean work for anyone. `poll`: only the timer
   * asks, which says nothing new: drained pools only probe (PROBE_CLAIM).
   */
  kick(creditOf?: PoolRecord, poll = false): void {
    if (!this.ctx.isRunning()) return;
    if (creditOf?.readyDrained) return;
    if (creditOf === undefined && !poll) this.ctx.pools.forgetDrained();
    this.wanted = true;
    if (this.rounds.size < DISPATCH_IN_FLIGHT) {
      const round: Promise<void> = this.loop().finally(() => this.rounds.delete(round));
      this.rounds.add(round);
    }
  }

  /** Dispatches again when a retry's backoff ends, rather than waiting for the next poll. */
  kickAt(when: number): void {
    const delay = when - Date.now();
    if (!(delay > 0) || !this.ctx.isRunning()) return;
    if (this.nextKickAt !== undefined && this.nextKickAt <= when && this.nextKickAt > Date.now()) return;
    clearTimeout(this.kickTimer);
    this.nextKickAt = when;
    this.kickTimer = setTimeout(() => {
      this.nextKickAt = undefined;
      this.kick();
    }, delay + 1);
  }

  /** Resolves when no round is running (none starts once the broker stops running). */
  async idle(): Promise<void> {
    clearTimeout(this.kickTimer);
    while (this.rounds.size > 0) await Promise.all([...this.rounds]);
  }

  /** A pool still registered, to a broker still running. */
  canSendTo(pool: PoolRecord): boolean {
    return this.ctx.pools.isCurrent(pool) && this.ctx.isRunning();
  }

  /** Sends claimed steps to the pool they were claimed for; false (nothing sent) when it left. */
  sendSteps(pool: PoolRecord, steps: ClaimedStep[]): boolean {
    if (!this.canSendTo(pool)) return false;
    const { ctx } = this;
    const now = Date.now();
    const dispatches: StepDispatch[] = [];
    for (const s of steps) {
      // Built field by field: object rest and spread per step were a large part of a round's CPU.
      const step: StepDispatch = {
        task_id: s.task_id,
        step_id: s.step_id,
        attempt_id: s.attempt_id,
        step_name: s.step_name,
        handler: s.handler,
        attempt: s.attempt,
        max_attempts: s.max_attempts,
        timeout_ms: s.timeout_ms,
        template: s.template,
        context: s.context,
        config: s.config,
        inputs: s.inputs,
      };
      const traceparent = s.traceparent ?? null;
      // only to pools that said they read it (HELLO trace_context): an older one would refuse the field
      if (pool.traceContext)
        step.trace = attemptTrace(s.task_id, s.attempt_id, traceparent, s.tracestate ?? null);
      ctx.pools.addInFlight(pool, {
        attemptId: s.attempt_id,
        stepId: s.step_id,
        taskId: s.task_id,
        stepName: s.step_name,
        handler: s.handler,
        attempt: s.attempt,
        maxAttempts: s.max_attempts,
        children: s.children,
        sentAt: now,
        traceparent,
      });
      dispatches.push(step);
    }
    const byHandler = new Map<string, number>();
    for (const s of steps) byHandler.set(s.handler, (byHandler.get(s.handler) ?? 0) + 1);
    for (const [handler, n] of byHandler) ctx.metrics.stepsDispatched(handler, pool.poolId, n);
    for (let i = 0; i < dispatches.length; i += ctx.opts.maxBatch) {
      ctx.send(
        pool.identity,
        BrokerCommands.STEP,
        { steps: dispatches.slice(i, i + ctx.opts.maxBatch) },
        pool.encoding,
      );
    }
    if (ctx.log.isLevelEnabled("debug")) {
      for (const s of steps) {
        ctx.log.debug(
          { task_id: s.task_id, step_id: s.step_id, attempt_id: s.attempt_id, pool_id: pool.poolId },
          `dispatched step ${s.step_name} to ${pool.poolId} (attempt ${s.attempt} of ${s.max_attempts})`,
        );
      }
    }
    return true;
  }

  /** A message could not be delivered: the pool's connection is gone. */
  onUndeliverable(identity: Buffer, frames: Buffer[]): void {
    const { ctx } = this;
    const key = identityKey(identity);
    const pool = ctx.pools.get(key);
    const command = frames[1]?.toString("latin1");
    const fields = { peer: key, pool_id: pool?.poolId, command };
    // While stopping, pools that already left are expected. While running, a peer that sends
    // requests by the thousand and leaves would otherwise get a line for every lost answer.
    if (!ctx.isRunning()) ctx.log.debug(fields, `could not deliver ${command}: the peer is gone`);
    else
      ctx.limiter.write(
        `gone:${key}`,
        `about undeliverable messages to ${pool?.poolId ?? JSON.stringify(key)}`,
        "warn",
        fields,
        `could not deliver ${command}: the peer is gone`,
      );
    if (pool && command === BrokerCommands.WELCOME) {
      // The pool dropped the socket it said HELLO on (no WELCOME in time) and
      // says HELLO again on a fresh one. Forget the registration but keep its
      // attempts leased, so that HELLO adopts them and their kept results are
      // stored; if it never comes back, their leases expire.
      ctx.pools.remove(pool.key);
    } else if (pool) this.unreachable(pool, "unreachable");
  }

  private async loop(): Promise<void> {
    const { pools } = this.ctx;
    while (this.wanted && this.ctx.isRunning()) {
      this.wanted = false;
      const ready = pools.withCredit();
      for (const pool of this.claiming.keys()) if (!ready.includes(pool)) this.owed.add(pool);
      if (ready.length === 0) return;
      // Pools that have had results stored claim first; pools that have proved nothing yet (maybe
      // silent ones) get only the work they left, so a swarm of those cannot starve a working pool.
      const proven = ready.filter((p) => p.stored > 0);
      const claimed = await Promise.all(proven.map((pool) => this.dispatchTo(pool)));
      // Handlers a proven pool still has credit for: work for them that is ready now or soon goes
      // to that pool on the next round, never to a pool on probation.
      const spare = new Set<string>();
      for (const p of proven) if (p.readyDrained) for (const h of p.handlers) spare.add(h);
      const unproven = ready.filter((p) => p.stored === 0 && [...p.handlers].some((h) => !spare.has(h)));
      if (unproven.length > 0) {
        const lost = this.lostWhereProven();
        claimed.push(...(await Promise.all(unproven.map((pool) => this.dispatchTo(pool, lost)))));
      }
      // A full round means more work may be waiting.
      if (claimed.some((full) => full)) this.wanted = true;
    }
  }

  /**
   * Steps whose last attempt timed out at this pool, for handlers another
   * pool has credit for now: this pool's claim skips them, so their retries
   * go to that pool rather than back to one that may never return them. And
   * `lost`, for an unproven pool (lostWhereProven).
   */
  private retriesForOthers(pool: PoolRecord, lost: readonly string[]): string[] {
    const { pools } = this.ctx;
    if (pool.timedOutSteps.size === 0) return [...lost];
    const elsewhere = new Set<string>();
    for (const other of pools.all()) {
      if (other === pool || pools.credit(other) === 0) continue;
      for (const h of other.handlers) elsewhere.add(h);
    }
    const avoid = [...lost];
    for (const [stepId, handler] of pool.timedOutSteps) if (elsewhere.has(handler)) avoid.push(stepId);
    return avoid;
  }

  /**
   * Steps lost at an unproven pool whose handler a proven pool serves: no
   * unproven pool may claim them (LostProbes). Once a round, for all of its
   * unproven pools.
   */
  private lostWhereProven(): string[] {
    const { pools } = this.ctx;
    if (pools.lostProbes.size === 0) return [];
    const proven = new Set<string>();
    for (const other of pools.all()) if (other.stored > 0) for (const h of other.handlers) proven.add(h);
    return pools.lostProbes.of(proven);
  }

  /** Claims up to the pool's credit (a probe's, if it was drained) of steps it serves and sends them; true when it filled it. */
  private async dispatchTo(pool: PoolRecord, lost: readonly string[] = []): Promise<boolean> {
    const { ctx } = this;
    const free = ctx.pools.credit(pool);
    if (free === 0) return false;
    const credit = pool.readyDrained ? Math.min(free, PROBE_CLAIM) : free;
    let steps: ClaimedStep[];
    // Set aside while the claim runs, so a commit meanwhile does not claim children against it.
    const reservation = ctx.pools.reserve(pool, credit);
    this.claiming.set(pool, (this.claiming.get(pool) ?? 0) + 1);
    const started = performance.now();
    try {
      const avoid = this.retriesForOthers(pool, lost);
      steps = await ctx.state.claimSteps({
        brokerId: ctx.id,
        poolId: pool.poolId,
        handlers: [...pool.handlers],
        limit: credit,
        ...(avoid.length > 0 ? { avoidStepIds: avoid } : {}),
      });
      ctx.metrics.claim(performance.now() - started);
    } catch (e) {
      if (!isDataError(e)) ctx.metrics.dbError();
      const err = coerceError(e);
      ctx.limiter.write(
        `claim:${err.message}`,
        `for "claiming steps failed"`,
        "error",
        { err, pool_id: pool.poolId },
        `claiming steps failed: ${err.message}; retrying on the next poll`,
        { lines: 1 },
      );
      return false;
    } finally {
      reservation.settle();
      const n = this.claiming.get(pool)! - 1;
      if (n === 0) this.claiming.delete(pool);
      else this.claiming.set(pool, n);
      // Work may have appeared during this claim and found no credit for this pool: go again.
      if (this.owed.delete(pool)) this.wanted = true;
    }
    ctx.pools.noteClaimed(pool, steps.length < credit);
    if (steps.length === 0) return false;
    if (!this.sendSteps(pool, steps)) {
      // The pool left while we claimed: give the steps back untouched.
      await ctx.release(
        steps.map((s) => s.attempt_id),
        false,
        "pool left before dispatch",
      );
      return false;
    }
    return steps.length === credit;
  }
}
