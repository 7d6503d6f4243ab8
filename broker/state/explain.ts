/**
 * "Why is no step ready?" Per step, every readiness condition with a verdict
 * and a detail, and the first one that blocks it. Built from one read of the
 * task's steps; `formatExplain` renders it for `stepbroker explain <task>`.
 */
import { type StepState, StepStates } from "../../protocol/constants";
import { FAILED_STEP_STATES, FINISHED_PARENT_STATES } from "./transitions";
import type { ExplainCondition, ExplainRow, StepError } from "./types";

/** What explain needs to know about one step (a row of sql/queries/get_steps.sql). */
export interface ExplainInput {
  id: string;
  name: string;
  handler: string;
  state: StepState;
  attempts: number;
  maxAttempts: number;
  retryable: boolean;
  error: StepError | null;
  runAt: Date;
  leaseAttemptId: string | null;
  leaseBrokerId: string | null;
  leaseExpiresAt: Date | null;
  parents: { name: string; state: StepState }[];
  /** The database clock when the rows were read (leases and backoffs are judged by it). */
  now: Date;
}

function ms(n: number): string {
  return n >= 10_000 ? `${(n / 1000).toFixed(1)} s` : `${Math.round(n)} ms`;
}

/** Names of failed steps (error, cancelled) that block `name`, directly or through unfinished parents. */
export function failedAncestors(
  name: string,
  byName: ReadonlyMap<string, Pick<ExplainInput, "parents">>,
  seen = new Set<string>(),
): string[] {
  const step = byName.get(name);
  if (step === undefined || seen.has(name)) return [];
  seen.add(name);
  const found: string[] = [];
  for (const parent of step.parents) {
    if (FAILED_STEP_STATES.includes(parent.state)) found.push(parent.name);
    else if (!FINISHED_PARENT_STATES.includes(parent.state))
      found.push(...failedAncestors(parent.name, byName, seen));
  }
  return [...new Set(found)];
}

function parentsCondition(step: ExplainInput, byName: Map<string, ExplainInput>): ExplainCondition {
  const unfinished = step.parents.filter((p) => !FINISHED_PARENT_STATES.includes(p.state));
  if (unfinished.length === 0) {
    const detail = step.parents.length === 0 ? "no parents" : `all ${step.parents.length} parents finished`;
    return { name: "parents", ok: true, detail };
  }
  const parts = unfinished.map((p) => {
    if (FAILED_STEP_STATES.includes(p.state)) return `blocked by failed parent "${p.name}" (${p.state})`;
    const failed = failedAncestors(p.name, byName);
    const waiting = `waiting for "${p.name}" (${p.state})`;
    return failed.length === 0
      ? waiting
      : `${waiting}, which is blocked by failed step ${failed.map((f) => `"${f}"`).join(", ")}`;
  });
  return { name: "parents", ok: false, detail: parts.join("; ") };
}

function stateCondition(step: ExplainInput): ExplainCondition {
  const detail: Record<StepState, string> = {
    [StepStates.PENDING]: "pending: waits for its parents",
    [StepStates.READY]: "ready",
    [StepStates.IN_PROGRESS]: `in_progress: attempt ${step.attempts} of ${step.maxAttempts} is running`,
    [StepStates.COMPLETE]: "complete: finished, output stored",
    [StepStates.ERROR]: `error: ${step.error ? `${step.error.type}: ${step.error.message}` : "failed"} (retry or resolve it)`,
    [StepStates.CANCELLED]: "cancelled with its task (retry the task to run it)",
    [StepStates.RESOLVED_MANUALLY]: "resolved_manually by an operator",
  };
  return { name: "state", ok: step.state === StepStates.READY, detail: detail[step.state] };
}

function attemptsCondition(step: ExplainInput): ExplainCondition {
  const exhausted = step.state === StepStates.ERROR && step.attempts >= step.maxAttempts;
  const noRetries = step.retryable ? "" : ", retries disabled by the template";
  return {
    name: "attempts",
    ok: !exhausted,
    detail: `${step.attempts} of ${step.maxAttempts} used${noRetries}`,
  };
}

function backoffCondition(step: ExplainInput): ExplainCondition {
  const wait = step.runAt.getTime() - step.now.getTime();
  if (step.state !== StepStates.READY || wait <= 0) {
    return { name: "backoff", ok: true, detail: step.state === StepStates.READY ? "elapsed" : "not waiting" };
  }
  return {
    name: "backoff",
    ok: false,
    detail: `waits until ${step.runAt.toISOString()} (${ms(wait)} from now)`,
  };
}

function leaseCondition(step: ExplainInput): ExplainCondition {
  if (step.leaseAttemptId === null || step.leaseExpiresAt === null)
    return { name: "lease", ok: true, detail: "free" };
  const left = step.leaseExpiresAt.getTime() - step.now.getTime();
  const holder = `held by attempt ${step.leaseAttemptId} of broker ${step.leaseBrokerId ?? "?"}`;
  return {
    name: "lease",
    ok: false,
    detail:
      left >= 0
        ? `${holder} until ${step.leaseExpiresAt.toISOString()} (${ms(left)} left)`
        : `${holder}, expired ${ms(-left)} ago: the lease reaper will take it back`,
  };
}

export function explainSteps(steps: ExplainInput[], servedHandlers?: ReadonlySet<string>): ExplainRow[] {
  const byName = new Map(steps.map((s) => [s.name, s]));
  return steps.map((step) => {
    const conditions: ExplainCondition[] = [
      parentsCondition(step, byName),
      stateCondition(step),
      attemptsCondition(step),
      backoffCondition(step),
      leaseCondition(step),
    ];
    if (servedHandlers !== undefined) {
      const served = servedHandlers.has(step.handler);
      conditions.push({
        name: "pool",
        ok: served,
        detail: served ? "a connected pool serves it" : `no connected pool serves handler "${step.handler}"`,
      });
    }
    return {
      stepId: step.id,
      name: step.name,
      handler: step.handler,
      state: step.state,
      attempts: step.attempts,
      maxAttempts: step.maxAttempts,
      conditions,
      blockedBy: conditions.find((c) => !c.ok)?.name ?? null,
    };
  });
}

/**
 * A text table, one line per step; with `verbose`, every condition below its step.
 *
 *   STEP     HANDLER  STATE    ATTEMPTS  BLOCKED BY  WHY
 *   charge   payment  error    3/3       state       error: Declined: card declined (retry or resolve it)
 *   ship     shipping pending  0/3       parents     blocked by failed parent "charge" (error)
 */
export function formatExplain(rows: ExplainRow[], options: { verbose?: boolean } = {}): string {
  const header = ["STEP", "HANDLER", "STATE", "ATTEMPTS", "BLOCKED BY", "WHY"];
  const body = rows.map((r) => {
    const blocking = r.conditions.find((c) => c.name === r.blockedBy);
    return [
      r.name,
      r.handler,
      r.state,
      `${r.attempts}/${r.maxAttempts}`,
      r.blockedBy ?? "-",
      blocking?.detail ?? "can be dispatched now",
    ];
  });
  const widths = header.map((h, i) => Math.max(h.length, ...body.map((line) => (line[i] ?? "").length)));
  const render = (cells: string[]): string =>
    cells
      .map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i] ?? 0)))
      .join("  ")
      .trimEnd();
  const lines = [render(header)];
  rows.forEach((r, i) => {
    lines.push(render(body[i] ?? []));
    if (options.verbose) {
      for (const c of r.conditions)
        lines.push(`    ${c.ok ? "ok  " : "FAIL"} ${c.name.padEnd(8)} ${c.detail}`);
    }
  });
  return lines.join("\n");
}
