/**
 * Where a sustained run's submit → complete time goes, on the broker's own
 * clock: the real state manager, noting when each of the three stages'
 * statements (create_tasks, claim_steps, complete_results) started and
 * returned, how many tasks each held, and for each task when it was created,
 * claimed, and when its result's commit started and returned. Between the
 * claim and the commit's start lie the pool's round trip and the wait in the
 * committer's queue; before the create statement's start lie the client's
 * send, the SUBMIT's decoding and the wait in the create batcher's queue.
 */
import type { StateManager } from "../broker/state/StateManager";

interface TaskStamps {
  createStart?: number;
  created?: number;
  claimStart?: number;
  claimed?: number;
  commitStart?: number;
  committed?: number;
}

interface Statement {
  start: number;
  ms: number;
  size: number;
}

export interface StageSplit {
  /** Per-task milliseconds between two marks, p50 and p99, over the measured tasks. */
  split: Record<string, { p50: number; p99: number }>;
  /** Per statement kind over the measured stretch: how many, their mean batch, their duration p50/p99 in ms. */
  statements: Record<string, { count: number; meanBatch: number; p50Ms: number; p99Ms: number }>;
}

export interface StageRecorder {
  /** The state manager to give the broker. */
  state: StateManager;
  /** The split for the tasks sent at `sentAt` (performance.now(), by task id) from `from` on. */
  report(sentAt: ReadonlyMap<string, number>, from: number, to: number): StageSplit;
}

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] ?? NaN;
}

const round1 = (x: number) => Math.round(x * 10) / 10;

export function recordStages(sm: StateManager): StageRecorder {
  const tasks = new Map<string, TaskStamps>();
  const taskOfAttempt = new Map<string, string>();
  const statements: Record<string, Statement[]> = { create: [], claim: [], commit: [] };
  const stamps = (taskId: string): TaskStamps => {
    let s = tasks.get(taskId);
    if (!s) tasks.set(taskId, (s = {}));
    return s;
  };
  const recording = Object.create(sm) as StateManager;
  recording.insertCreates = async (prepared) => {
    const start = performance.now();
    const out = await sm.insertCreates(prepared);
    const now = performance.now();
    statements.create!.push({ start, ms: now - start, size: prepared.length });
    for (const { id, created } of out) {
      if (!created) continue;
      const s = stamps(id);
      s.createStart = start;
      s.created = now;
    }
    return out;
  };
  recording.claimSteps = async (request) => {
    const start = performance.now();
    const out = await sm.claimSteps(request);
    const now = performance.now();
    statements.claim!.push({ start, ms: now - start, size: out.length });
    for (const c of out) {
      taskOfAttempt.set(c.attempt_id, c.task_id);
      const s = stamps(c.task_id);
      s.claimStart = start;
      s.claimed = now;
    }
    return out;
  };
  recording.completeAttempts = async (results, claim) => {
    const start = performance.now();
    const out = await sm.completeAttempts(results, claim);
    const now = performance.now();
    statements.commit!.push({ start, ms: now - start, size: results.length });
    for (const r of results) {
      const taskId = taskOfAttempt.get(r.attemptId);
      if (taskId === undefined) continue;
      const s = stamps(taskId);
      s.commitStart = start;
      s.committed = now;
    }
    for (const c of out.claimed) taskOfAttempt.set(c.attempt_id, c.task_id);
    return out;
  };

  const report = (sentAt: ReadonlyMap<string, number>, from: number, to: number): StageSplit => {
    const marks: [string, (s: TaskStamps, sent: number) => number | undefined][] = [
      ["submit→create statement", (s, sent) => (s.createStart ?? NaN) - sent],
      ["create statement", (s) => (s.created ?? NaN) - (s.createStart ?? NaN)],
      ["created→claim statement", (s) => (s.claimStart ?? NaN) - (s.created ?? NaN)],
      ["claim statement", (s) => (s.claimed ?? NaN) - (s.claimStart ?? NaN)],
      ["claimed→commit statement", (s) => (s.commitStart ?? NaN) - (s.claimed ?? NaN)],
      ["commit statement", (s) => (s.committed ?? NaN) - (s.commitStart ?? NaN)],
      ["submit→committed", (s, sent) => (s.committed ?? NaN) - sent],
    ];
    const split: StageSplit["split"] = {};
    for (const [name, of] of marks) {
      const xs: number[] = [];
      for (const [taskId, sent] of sentAt) {
        if (sent < from || sent >= to) continue;
        const s = tasks.get(taskId);
        const x = s && of(s, sent);
        if (x !== undefined && Number.isFinite(x)) xs.push(x);
      }
      xs.sort((a, b) => a - b);
      split[name] = { p50: round1(percentile(xs, 50)), p99: round1(percentile(xs, 99)) };
    }
    const byKind: StageSplit["statements"] = {};
    for (const [kind, list] of Object.entries(statements)) {
      const inRange = list.filter((s) => s.start >= from && s.start < to);
      const ms = inRange.map((s) => s.ms).sort((a, b) => a - b);
      const size = inRange.reduce((n, s) => n + s.size, 0);
      byKind[kind] = {
        count: inRange.length,
        meanBatch: round1(size / Math.max(1, inRange.length)),
        p50Ms: round1(percentile(ms, 50)),
        p99Ms: round1(percentile(ms, 99)),
      };
    }
    return { split, statements: byKind };
  };
  return { state: recording, report };
}
