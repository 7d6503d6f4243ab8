/**
 * Every string and number that crosses the wire is defined here, once.
 * The broker, the Node SDK and the tests import these; SDKs in other languages
 * copy them from PROTOCOL.md, which lists the same values.
 */

/** First frame of every message: protocol name and major version. */
export const PROTOCOL_NAME = "stepbroker";
export const PROTOCOL_VERSION = 1;
export const SIGNATURE = `${PROTOCOL_NAME}/${PROTOCOL_VERSION}`;

/** Commands a handler pool sends to the broker. */
export const PoolCommands = {
  HELLO: "HELLO",
  RESULT: "RESULT",
  PROGRESS: "PROGRESS",
  HEARTBEAT: "HEARTBEAT",
  DISCONNECT: "DISCONNECT",
  ERROR: "ERROR",
} as const;

/** Commands the broker sends to a handler pool. */
export const BrokerCommands = {
  WELCOME: "WELCOME",
  STEP: "STEP",
  ACK: "ACK",
  CANCEL: "CANCEL",
  HEARTBEAT: "HEARTBEAT",
  DISCONNECT: "DISCONNECT",
  ERROR: "ERROR",
} as const;

/** Commands a client (any service that starts work) sends to the broker. */
export const ClientCommands = {
  SUBMIT: "SUBMIT",
  STATUS: "STATUS",
  WAIT: "WAIT",
  CANCEL_TASK: "CANCEL_TASK",
  POOLS: "POOLS",
  HISTORY: "HISTORY",
} as const;

/** The broker's answer to a client command (errors come as ERROR). */
export const ClientReplies = {
  REPLY: "REPLY",
} as const;

export type PoolCommand = (typeof PoolCommands)[keyof typeof PoolCommands];
export type BrokerCommand = (typeof BrokerCommands)[keyof typeof BrokerCommands];
export type ClientCommand = (typeof ClientCommands)[keyof typeof ClientCommands];

/** Every command name, with the schema file that validates its body. */
export const COMMAND_SCHEMAS = {
  HELLO: "hello.json",
  WELCOME: "welcome.json",
  STEP: "step.json",
  RESULT: "result.json",
  ACK: "ack.json",
  PROGRESS: "progress.json",
  CANCEL: "cancel.json",
  HEARTBEAT: "heartbeat.json",
  DISCONNECT: "disconnect.json",
  ERROR: "error.json",
  SUBMIT: "submit.json",
  STATUS: "status.json",
  WAIT: "wait.json",
  CANCEL_TASK: "cancel_task.json",
  POOLS: "pools.json",
  HISTORY: "history.json",
  REPLY: "reply.json",
} as const;
export type CommandName = keyof typeof COMMAND_SCHEMAS;
export const COMMAND_NAMES = Object.keys(COMMAND_SCHEMAS) as CommandName[];

/** Body encodings. JSON is always understood; MessagePack on request. */
export const Encodings = { JSON: "json", MSGPACK: "msgpack" } as const;
export type Encoding = (typeof Encodings)[keyof typeof Encodings];

/**
 * Step states. The one vocabulary for every language and every table.
 *  pending            waiting for at least one parent to finish
 *  ready              may be dispatched (after `run_at`, when it waits a backoff)
 *  in_progress        dispatched to a pool under a lease held by one attempt
 *  complete           finished; its output is stored in the same transaction
 *  error              failed for good (permanent error or attempts exhausted)
 *  cancelled          its task was cancelled before it finished
 *  resolved_manually  an operator marked it done; dependents may proceed
 */
export const StepStates = {
  PENDING: "pending",
  READY: "ready",
  IN_PROGRESS: "in_progress",
  COMPLETE: "complete",
  ERROR: "error",
  CANCELLED: "cancelled",
  RESOLVED_MANUALLY: "resolved_manually",
} as const;
export type StepState = (typeof StepStates)[keyof typeof StepStates];

export const TaskStates = {
  PENDING: "pending",
  IN_PROGRESS: "in_progress",
  COMPLETE: "complete",
  ERROR: "error",
  CANCELLED: "cancelled",
} as const;
export type TaskState = (typeof TaskStates)[keyof typeof TaskStates];

/** What a handler reports for one attempt: a subset of the step states. */
export const ResultStatuses = { COMPLETE: "complete", ERROR: "error" } as const;
export type ResultStatus = (typeof ResultStatuses)[keyof typeof ResultStatuses];

/**
 * Error types the protocol itself reserves for `step_error.type` (any other
 * type is the handler's own, e.g. its exception class). Every SDK and the
 * broker write these same strings; protocol/schemas/common.json
 * (`$defs/reserved_error_type`) lists them with who writes each.
 */
export const StepErrorTypes = {
  /** (pool) the STEP names a handler this pool does not serve. */
  UNKNOWN_HANDLER: "unknown_handler",
  /** (pool) the result would exceed the broker's max_message_bytes. */
  OUTPUT_TOO_LARGE: "output_too_large",
  /** (pool) the handler returned a value JSON cannot carry. */
  INVALID_OUTPUT: "invalid_output",
  /** (pool) the result item the pool built fails result.json (say, an error message too long). */
  INVALID_RESULT: "invalid_result",
  /** (broker) the attempt's lease ran out without a result. */
  TIMEOUT: "timeout",
  /** (broker) the pool holding the attempt was lost (missed heartbeats, unreachable, reconnected without it). */
  LOST: "lost",
  /** (broker) the STEP could not be delivered, or the pool said it could not read it. */
  UNDELIVERED: "undelivered",
  /** (broker) PostgreSQL would not store the attempt's result; the pool was told with ERROR unstorable_value. */
  UNSTORABLE_RESULT: "unstorable_result",
} as const;
export type StepErrorType = (typeof StepErrorTypes)[keyof typeof StepErrorTypes];

/** What the broker did with one result, as told in ACK. */
export const AckOutcomes = {
  /** stored: this attempt's result is now the step's result. */
  STORED: "stored",
  /** duplicate: this attempt's result was stored before; nothing changed. */
  DUPLICATE: "duplicate",
  /** stale: the attempt no longer holds the step's lease; the result was refused. */
  STALE: "stale",
  /** unknown: no such attempt exists. */
  UNKNOWN: "unknown",
} as const;
export type AckOutcome = (typeof AckOutcomes)[keyof typeof AckOutcomes];

/** Why the broker asks a pool to stop an attempt. */
export const CancelReasons = {
  TASK_CANCELLED: "task_cancelled",
  TIMEOUT: "timeout",
  LEASE_LOST: "lease_lost",
  SHUTDOWN: "shutdown",
} as const;
export type CancelReason = (typeof CancelReasons)[keyof typeof CancelReasons];

/**
 * Liveness. A peer that hears nothing from the other side for
 * HEARTBEAT_INTERVAL_MS * HEARTBEAT_LIVENESS considers it dead.
 * Any message counts as a sign of life, not only HEARTBEAT.
 * 1 s and 3 misses: a dead pool is noticed within ~3 s, three times faster
 * than Majordomo's 2.5 s x 3, which matters because its steps wait meanwhile.
 */
export const HEARTBEAT_INTERVAL_MS = 1000;
export const HEARTBEAT_LIVENESS = 3;

/** A body larger than this is refused with `message_too_large` (configurable). */
export const MAX_MESSAGE_BYTES = 1024 * 1024;
/**
 * libzmq's own limit (ZMQ_MAXMSGSIZE) is set this many times higher, so a
 * merely oversized message is answered with an error instead of libzmq
 * silently dropping the connection; only a grossly oversized one is cut off.
 */
export const HARD_LIMIT_FACTOR = 16;
/** Most steps in one STEP message, results in one RESULT message. */
export const MAX_BATCH = 64;
/**
 * How deeply a body may nest, counting the body's own object as level 1, the
 * same for JSON and MessagePack. Checked over the bytes before the body is
 * parsed, so a deep body costs a scan, not a parser's recursion and memory.
 */
export const MAX_DEPTH = 64;
/**
 * How deeply a free-form value (a SUBMIT context, a RESULT output, usage or
 * error details) may nest on its own. The broker carries these onward deeper
 * than they arrived (a RESULT output sits at level 4, the same output in a
 * later STEP's inputs or a REPLY at level 5 or 6), so they get less room than
 * a body: every body that carries them stays within MAX_DEPTH.
 */
export const MAX_VALUE_DEPTH = 56;

/** common.json $defs/id: a task, step or attempt id, a UUID in lowercase. */
export const ID_PATTERN = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
/** common.json $defs/name: a handler, step, namespace or template name. */
export const NAME_PATTERN = /^[A-Za-z_][A-Za-z0-9_.:-]{0,127}$/;
/** A peer that sends this many bad messages in a row (ERRORs included, see PROTOCOL.md) is disconnected. */

export const MAX_CONSECUTIVE_ERRORS = 10;

/**
 * Stable error codes. Code that receives an error from another process
 * matches on `code`, never on message text. Each entry says what to do.
 */
export const ErrorCodes = {
  malformed_frame:
    "The message does not have the frames [signature, command, body]. Send exactly three frames.",
  unsupported_version: `The signature frame is not "${SIGNATURE}". Upgrade the SDK or the broker so both speak this version.`,
  unknown_command:
    "The command frame names no command of this protocol. Check the spelling against PROTOCOL.md.",
  undecodable_body:
    "The body is neither valid JSON nor valid MessagePack. Encode the body as one JSON object or one MessagePack map.",
  schema_violation:
    "The body does not match the command's JSON Schema. See schema_path and instance_path for the failing rule.",
  message_too_large:
    "The message is larger than the broker's limit (max_message_bytes in WELCOME). Send fewer steps or results per message, or smaller outputs.",
  unstorable_value:
    "A string or object key holds U+0000 or an unpaired surrogate (\\ud800-\\udfff), which PostgreSQL cannot store. instance_path names it; remove or escape it (e.g. base64) before sending.",
  too_deep: `The body nests deeper than the protocol allows (${MAX_DEPTH} levels for a body, ${MAX_VALUE_DEPTH} for a context, output, usage or error details of its own). Flatten the data, or send it as a string.`,
  hello_required:
    "The pool sent a command before its HELLO was accepted. Send HELLO first and wait for WELCOME.",
  hello_rejected: "The HELLO was refused. Read the message for the reason and fix the pool's configuration.",
  identity_mismatch:
    "The HELLO's pool_id differs from the socket's routing id. Set the DEALER's routing id to the pool_id (UTF-8) and connect again.",
  session_mismatch:
    "This pool_id is held by another pool session (its registration is connected, or its attempts are still leased). Use a pool_id of your own, or send the session secret of the process that holds it.",
  not_your_attempt:
    "The attempt was sent to another pool; a pool may report, extend, hand back or adopt only its own attempts. Nothing was changed; the pool should forget this attempt.",
  unknown_attempt: "No attempt with this id exists. The result was dropped; the pool may forget it.",
  stale_attempt:
    "The attempt no longer holds the step's lease (it timed out, was cancelled or was re-dispatched). The result was refused; the pool may forget it.",
  unknown_task: "No task with this id exists. Check the id.",
  unknown_template:
    "No template with this namespace, name and version is registered. Register it or check the name.",
  invalid_request: "The request is well-formed but cannot be carried out. Read the message for the reason.",
  forbidden:
    "The command is not allowed for the role of the socket it came in on (pool, client or admin). Connect to the socket of that role, with a key on its allow-list; see PROTOCOL.md, Roles and sockets.",
  too_many_errors:
    "The peer sent too many bad messages in a row (ERRORs included) and was disconnected. Fix the peer, then reconnect.",
  over_budget:
    "The peer sent more per second than its work budget (bytes or messages) for several seconds and was disconnected; messages over the budget were dropped unread. Send fewer, larger batches, then reconnect.",
  reply_too_large:
    "The reply would be larger than max_message_bytes, so it was not sent; the request itself was carried out (a SUBMIT created its task). Ask for less: keep contexts and step outputs small (store large data elsewhere and pass references), or read the task from the database.",
  shutting_down:
    "The broker is shutting down. Reconnect; another broker or this one after restart will serve you.",
  internal_error:
    "The broker failed while handling the message. It keeps running; report the log line with this message's ids.",
} as const;
export type ErrorCode = keyof typeof ErrorCodes;
export const ERROR_CODES = Object.keys(ErrorCodes) as ErrorCode[];
