/**
 * The Node.js handler SDK of stepbroker: a pool of handlers that connects to
 * one or more brokers, runs the steps they send and reports each outcome.
 * It needs only `../protocol` (and zeromq, pino): no PostgreSQL, no broker code.
 */
export { HandlerPool, PoolStates, type PoolState } from "./HandlerPool";
export {
  HandlerError,
  PermanentError,
  RetryableError,
  StepAbortedError,
  permanent,
  retryAfter,
  toWireError,
  type AbortCode,
  type HandlerErrorOptions,
} from "./errors";
export type {
  CloseOptions,
  CurveOptions,
  Handler,
  HandlerPoolOptions,
  StartOptions,
  Step,
  StepContext,
  StepTrace,
} from "./types";
export { SDK, SDK_VERSION } from "./version";
export {
  isZ85Key,
  readKeyPairFile,
  readPublicKey,
  writeKeyPairFiles,
  type CurveKeyPair,
} from "../protocol/curveKeys";
