/**
 * What the broker needs from the state manager. The broker never writes task
 * or step state itself; every change goes through these calls. Naming the
 * subset keeps the broker honest about its dependencies.
 */
import type { StateManager } from "./state/StateManager";

export type StatePort = Pick<
  StateManager,
  | "claimSteps"
  | "completeAttempts"
  | "extendLeases"
  | "expireLeases"
  | "releaseAttempts"
  | "adoptAttempts"
  | "foreignAttempts"
  | "takePoolSession"
  | "recoverOrphans"
  | "cancelTask"
  | "createTask"
  | "prepareCreates"
  | "insertCreates"
  | "getTask"
  | "getTasks"
  | "getHistory"
  | "listen"
  | "registerBroker"
  | "heartbeatBroker"
  | "markBrokerStopped"
  | "reclaimDeadBrokers"
  | "ensureHistoryPartitions"
  | "pruneHistory"
>;

export type {
  AttemptResult,
  ChildClaim,
  ClaimedStep,
  CompletionResult,
  CreateTaskRequest,
  PreparedCreate,
  PreparedTask,
} from "./state/types";
