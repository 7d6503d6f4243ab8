import type * as T from "./types.generated";
import type { CommandName } from "./constants";

/** The body type of each command, from the generated schema types. */
export interface BodyByCommand {
  HELLO: T.HelloBody;
  WELCOME: T.WelcomeBody;
  STEP: T.StepBody;
  RESULT: T.ResultBody;
  ACK: T.AckBody;
  PROGRESS: T.ProgressBody;
  CANCEL: T.CancelBody;
  HEARTBEAT: T.HeartbeatBody;
  DISCONNECT: T.DisconnectBody;
  ERROR: T.ErrorBody;
  SUBMIT: T.SubmitBody;
  STATUS: T.StatusBody;
  WAIT: T.WaitBody;
  CANCEL_TASK: T.CancelTaskBody;
  POOLS: T.PoolsBody;
  HISTORY: T.HistoryBody;
  REPLY: T.ReplyBody;
}
export type BodyOf<C extends CommandName> = BodyByCommand[C];

/** A decoded message: command and body travel together so narrowing works. */
export type Message = { [C in CommandName]: { command: C; body: BodyByCommand[C] } }[CommandName];
