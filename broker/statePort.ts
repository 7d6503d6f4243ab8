/**
 * What the broker needs from the state manager. The broker never writes task
 * or step state itself; every change goes through these calls.
 */
import type { StepError, TaskView, TemplateRef, Usage, ReplyBody } from "../protocol";

export interface ClaimedStep {
  taskId: string;
  stepId: string;
  attemptId: string;
  stepName: string;
  handler: string;
  attempt: number;
  maxAttempts: number;
  timeoutMs: number;
  template: TemplateRef;
  context: Record<string, unknown>;
  config: Record<string, unknown>;
  inputs: Record<string, unknown>;
}

export interface AttemptResult {
  attemptId: string;
  status: "complete" | "error";
  output?: unknown;
  error?: StepError;
  durationMs?: number;
  usage?: Usage;
  poolId?: string;
}

export type AttemptOutcomeKind = "stored" | "duplicate" | "stale" | "unknown";

export interface CompletionBatch {
  outcomes: { attemptId: string; outcome: AttemptOutcomeKind }[];
  readied: { stepId: string; handler: string }[];
  finishedTasks: { taskId: string; state: string }[];
}

export interface AdoptedAttempt {
  attemptId: string;
  stepId: string;
  taskId: string;
  stepName: string;
  handler: string;
  attempt: number;
  maxAttempts: number;
}

export interface CreateTaskRequest {
  namespace: string;
  name: string;
  version?: string;
  context: Record<string, unknown>;
  idempotencyKey?: string;
  priority?: number;
}

export type { ReplyBody };

export interface StatePort {
  claimSteps(req: { brokerId: string; handlers: string[]; limit: number }): Promise<ClaimedStep[]>;
  completeAttempts(results: AttemptResult[]): Promise<CompletionBatch>;
  extendLeases(attemptIds: string[]): Promise<string[]>;
  expireLeases(req: { brokerId?: string }): Promise<{ attemptId: string; taskId: string; stepName: string }[]>;
  releaseAttempts(attemptIds: string[], opts: { countAttempt: boolean; reason: string }): Promise<unknown>;
  adoptAttempts(attemptIds: string[], brokerId: string): Promise<AdoptedAttempt[]>;
  recoverOrphans(req: { brokerId: string; startedBefore: Date; keep: string[] }): Promise<string[]>;
  cancelTask(taskId: string): Promise<{ cancelledAttempts: string[] } | null>;
  createTask(req: CreateTaskRequest): Promise<{ task: TaskView; created: boolean }>;
  getTask(taskId: string, opts?: { includeSteps?: boolean }): Promise<TaskView | null>;
  listenForWork(onWork: () => void): Promise<() => Promise<void>>;
}
