/**
 * A task's history as one readable timeline: its own and its steps'
 * transitions, and each attempt's start and end, in time order
 * (`stepbroker history <task>`).
 */
import type { TransitionRecord } from "./DashboardReads";
import type { AttemptRecord, TaskView } from "./types";

export interface TaskHistory {
  task: TaskView;
  transitions: TransitionRecord[];
  attempts: AttemptRecord[];
}

interface Line {
  at: string;
  /** Orders lines of the same millisecond: a result before the moves it causes, a claim before the attempt it starts. */
  rank: number;
  who: string;
  what: string;
}

/** Shortens JSON for one line of a terminal. */
export function shortJson(value: unknown, max = 80): string {
  const t = JSON.stringify(value) ?? "undefined";
  return t.length > max ? `${t.slice(0, max - 1)}…` : t;
}

export function formatHistory(h: TaskHistory): string {
  const { task } = h;
  const lines: Line[] = [];
  for (const t of h.transitions) {
    lines.push({
      at: t.at,
      rank: 0,
      who: t.stepName ?? "(task)",
      what: `${t.from ?? "∅"} → ${t.to}  (${t.event})`,
    });
  }
  for (const a of h.attempts) {
    lines.push({
      at: a.startedAt,
      rank: 1,
      who: a.stepName,
      what: `attempt ${a.attempt} sent to ${a.poolId ?? "(no pool)"} by ${a.brokerId}`,
    });
    if (a.finishedAt !== null) {
      const took = a.durationMs === null ? "" : ` after ${Math.round(a.durationMs)} ms`;
      const err = a.error ? `: ${shortJson(a.error, 100)}` : "";
      lines.push({
        at: a.finishedAt,
        rank: -1,
        who: a.stepName,
        what: `attempt ${a.attempt} ${a.outcome}${took}${err}`,
      });
    }
  }
  // stable: transitions of one millisecond keep the database's order
  lines.sort((x, y) => (x.at < y.at ? -1 : x.at > y.at ? 1 : x.rank - y.rank));
  const width = Math.min(24, Math.max(6, ...lines.map((l) => l.who.length)));
  const head = [
    `task ${task.task_id} ${task.template.namespace}/${task.template.name}@${task.template.version}: ${task.state}`,
    `created ${task.created_at}${task.finished_at ? `, finished ${task.finished_at}` : ""}`,
  ];
  if (task.error) head.push(`error: ${shortJson(task.error, 200)}`);
  const body = lines.map(
    (l) => `${l.at.replace("T", " ").replace("Z", "")}  ${l.who.padEnd(width)}  ${l.what}`,
  );
  return [...head, "", ...(body.length ? body : ["(no history recorded)"])].join("\n");
}
