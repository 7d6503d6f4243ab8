/**
 * Clients waiting for tasks to end (WAIT, and `Broker.wait` in process). A
 * waiter is answered when a commit here finishes its task, when the poll
 * finds it finished (another process finished it), when its timeout passes
 * (with the task as it is then), or, with WaitInterrupted, when the broker
 * stops.
 */
import { TaskStates, type TaskView } from "../../protocol";
import type { BrokerContext } from "../BrokerContext";

const TERMINAL_TASK_STATES = new Set<string>([TaskStates.COMPLETE, TaskStates.ERROR, TaskStates.CANCELLED]);

export function isTerminal(state: string): boolean {
  return TERMINAL_TASK_STATES.has(state);
}

/** How a WAIT ends when the broker stops under it: the client should WAIT again, elsewhere or later. */
export class WaitInterrupted extends Error {
  readonly code = "shutting_down";
  constructor(taskId: string) {
    super(
      `The broker is stopping; task ${taskId} has not finished. WAIT again, with backoff, on another broker or on this one once it is back`,
    );
    this.name = "WaitInterrupted";
  }
}

interface Waiter {
  done(task: TaskView, finished: boolean): void;
  fail(e: Error): void;
  /** Set once the task was read and found running. */
  timer: NodeJS.Timeout | undefined;
}

export class Waiters {
  private readonly waiting = new Map<string, Set<Waiter>>();

  constructor(private readonly ctx: BrokerContext) {}

  /**
   * Resolves with the task when it ends, or as it is when `timeoutMs` passes
   * (finished: false). The waiter is registered before the task is read, so
   * an end announced while the read runs finds it (and reads again) instead
   * of being missed.
   */
  async wait(taskId: string, timeoutMs: number): Promise<{ task: TaskView; finished: boolean } | null> {
    const { state } = this.ctx;
    let done!: (task: TaskView, finished: boolean) => void;
    let fail!: (e: Error) => void;
    const answered = new Promise<{ task: TaskView; finished: boolean }>((resolve, reject) => {
      done = (task, finished) => resolve({ task, finished });
      fail = reject;
    });
    let settled = false;
    const waiter: Waiter = {
      done: (task, finished) => {
        settled = true;
        done(task, finished);
      },
      fail: (e) => {
        settled = true;
        fail(e);
      },
      timer: undefined,
    };
    let set = this.waiting.get(taskId);
    if (!set) this.waiting.set(taskId, (set = new Set()));
    set.add(waiter);
    const forget = (): void => {
      const current = this.waiting.get(taskId);
      current?.delete(waiter);
      if (current?.size === 0) this.waiting.delete(taskId);
    };
    let task: TaskView | null;
    try {
      task = await state.getTask(taskId, { includeSteps: true });
    } catch (e) {
      forget();
      throw e;
    }
    if (settled) return answered;
    if (!task || isTerminal(task.state)) {
      forget();
      return task ? { task, finished: true } : null;
    }
    const seen = task;
    waiter.timer = setTimeout(() => {
      forget();
      void state.getTask(taskId, { includeSteps: true }).then(
        (t) => done(t ?? seen, t ? isTerminal(t.state) : false),
        () => done(seen, false),
      );
    }, timeoutMs);
    return answered;
  }

  /** A commit here ended the task: its line in the log, and its waiters answered. */
  async taskFinished(taskId: string, state: string): Promise<void> {
    this.ctx.log.info({ task_id: taskId, state }, `task ${taskId} finished: ${state}`);
    if (!this.waiting.has(taskId)) return;
    const task = await this.ctx.state.getTask(taskId, { includeSteps: true });
    if (task) this.finish(taskId, task);
  }

  /** Answers the task's waiters if the task has ended. */
  finish(taskId: string, task: TaskView): void {
    if (!isTerminal(task.state)) return;
    const set = this.waiting.get(taskId);
    if (!set) return;
    this.waiting.delete(taskId);
    for (const w of set) {
      clearTimeout(w.timer);
      w.done(task, true);
    }
  }

  /** The task may have finished (another broker said so): its waiters, if any, get it as it is now. */
  async check(taskId: string): Promise<void> {
    if (!this.waiting.has(taskId)) return;
    const task = await this.ctx.state.getTask(taskId, { includeSteps: true }).catch(() => null);
    if (task) this.finish(taskId, task);
  }

  /** The poll's safety net: tasks finished by another process answer their waiters here too. */
  async refresh(): Promise<void> {
    for (const taskId of [...this.waiting.keys()]) {
      const task = await this.ctx.state.getTask(taskId, { includeSteps: true }).catch(() => null);
      if (task) this.finish(taskId, task);
    }
  }

  /** At stop: every WAIT still open ends with WaitInterrupted (ERROR shutting_down on the wire). */
  closeAll(): void {
    for (const [taskId, set] of this.waiting) {
      for (const w of set) {
        clearTimeout(w.timer);
        w.fail(new WaitInterrupted(taskId));
      }
    }
    this.waiting.clear();
  }
}
