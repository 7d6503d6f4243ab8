export { StateManager, type StateManagerOptions } from "./StateManager";
export { StateError } from "./errors";
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
