export * from "./constants";
export * from "./errors";
export * from "./codec";
export * from "./validateBody";
export { depthOf, pointer, storableText, valueProblem, type ValueProblem } from "./storableValues";
export type * from "./bodies";
// Encoding, ErrorCode and the state unions come from ./constants; a test checks they match the schemas.
export type {
  Id,
  RequestId,
  Name,
  Metadata,
  Version,
  Timestamp,
  ResultItem,
  AckBody,
  AckItem,
  CancelBody,
  CancelItem,
  CancelTaskBody,
  DisconnectBody,
  ErrorBody,
  HeartbeatBody,
  HelloBody,
  Sdk,
  PoolsBody,
  ProgressBody,
  ProgressItem,
  ReplyBody,
  TaskView,
  TemplateRef,
  TaskError,
  StepView,
  StepError,
  PoolView,
  ResultBody,
  Usage,
  StatusBody,
  StepBody,
  StepDispatch,
  SubmitBody,
  TemplateSelector,
  WaitBody,
  WelcomeBody,
  HistoryBody,
  TaskHistory as TaskHistoryView,
  TransitionView,
  AttemptView,
} from "./types.generated";
export {
  attemptSpanId,
  attemptTrace,
  taskTrace,
  traceContext,
  TRACEPARENT,
  type AttemptTrace,
  type TaskTrace,
  type TraceParts,
} from "./traceContext";
