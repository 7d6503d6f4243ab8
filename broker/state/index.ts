export { StateManager, type StateManagerOptions } from "./StateManager";
export { StateError } from "./errors";
export {
  BROKER_DEAD_AFTER_MS,
  BROKER_HEARTBEAT_INTERVAL_MS,
  BROKER_RECLAIM_INTERVAL_MS,
  type ReclaimSummary,
  summarizeReclaims,
} from "./BrokerRegistry";
export { explainSteps, formatExplain } from "./explain";
export {
  TemplateError,
  TemplateErrorCodes,
  type TemplateErrorCode,
  type TemplateProblem,
  loadTemplateFile,
  parseTemplate,
  validateTemplate,
} from "./templates";
export { STEP_MOVES, TASK_MOVES, TransitionEvents, AttemptEndings } from "./transitions";
export type * from "./types";
