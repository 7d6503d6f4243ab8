/**
 * A hand-written check of the bodies a pool receives once per step (STEP and
 * ACK), in their usual shape. The compiled Ajv validator for them was a
 * visible part of a pool's CPU per step: its generated code walks every
 * keyword of every item, where this tests the few that matter in a fixed
 * order and proves additionalProperties by counting keys. (The patterns stay
 * regular expressions: irregexp matched an id faster than a loop over its
 * character codes did.)
 *
 * It only ever says "surely valid": `true` means the schema accepts the body
 * (it checks a subset of what the schema allows, each part exactly as the
 * schema states it), `false` means "not proven", and the caller then runs the
 * Ajv validator, which decides and names the error. So a malformed body gets
 * the same answer as before, and a valid body of an unusual shape just takes
 * the slower path. test/protocol/isPlainBody.test.ts holds both to that
 * against every vector and a set of near misses.
 */
import { ID_PATTERN as ID, NAME_PATTERN as NAME, type CommandName } from "./constants";
import { TRACEPARENT } from "./traceContext";

/** `^[0-9A-Za-z][0-9A-Za-z._+-]{0,63}$` (common.json $defs/version). */
const VERSION = /^[0-9A-Za-z][0-9A-Za-z._+-]{0,63}$/;
/** common.json $defs/tracestate's pattern; its maxLength (512) is checked beside it. */
const TRACESTATE = /^[ -~]*$/;
/** The keys of a StepDispatch that step.json requires: 12 of them, plus the optional `trace`. */
const STEP_REQUIRED_KEYS = 12;

/** A string of $defs/id (the length first: most strings that are not ids fail it). */
function isId(v: unknown): boolean {
  return typeof v === "string" && v.length === 36 && ID.test(v);
}

function isTraceparent(v: unknown): boolean {
  return typeof v === "string" && v.length === 55 && TRACEPARENT.test(v);
}

function isName(v: unknown): boolean {
  return typeof v === "string" && v.length <= 128 && NAME.test(v);
}

/** JSON Schema's "object": not null, not an array. */
function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** JSON Schema's "integer" with minimum 1. */
function isPositiveInteger(v: unknown): boolean {
  return typeof v === "number" && Number.isInteger(v) && v >= 1;
}

/** How many enumerable keys `o` has, as the schema's additionalProperties walks them (for...in). */
function keyCount(o: object): number {
  let n = 0;
  for (const _ in o) n++;
  return n;
}

/** common.json $defs/template_ref: exactly namespace, name and version. */
function isTemplateRef(v: unknown): boolean {
  return (
    isObject(v) &&
    isName(v.namespace) &&
    isName(v.name) &&
    typeof v.version === "string" &&
    v.version.length <= 64 &&
    VERSION.test(v.version) &&
    keyCount(v) === 3
  );
}

/** common.json $defs/trace_context: traceparent, and tracestate when present. */
function isTraceContext(v: unknown): boolean {
  if (!isObject(v) || !isTraceparent(v.traceparent)) return false;
  const state = v.tracestate;
  if (state === undefined) return keyCount(v) === 1;
  return typeof state === "string" && state.length <= 512 && TRACESTATE.test(state) && keyCount(v) === 2;
}

/** One item of step.json's `steps`. */
function isStepDispatch(v: unknown): boolean {
  if (!isObject(v)) return false;
  const hasTrace = v.trace !== undefined;
  return (
    isId(v.task_id) &&
    isId(v.step_id) &&
    isId(v.attempt_id) &&
    isName(v.step_name) &&
    isName(v.handler) &&
    isPositiveInteger(v.attempt) &&
    isPositiveInteger(v.max_attempts) &&
    isPositiveInteger(v.timeout_ms) &&
    isTemplateRef(v.template) &&
    isObject(v.context) &&
    isObject(v.config) &&
    isObject(v.inputs) &&
    (!hasTrace || isTraceContext(v.trace)) &&
    // every required key is present and none repeats, so any other key makes the count larger
    keyCount(v) === STEP_REQUIRED_KEYS + (hasTrace ? 1 : 0)
  );
}

/** One item of ack.json's `acks`. */
function isAckItem(v: unknown): boolean {
  if (!isObject(v) || !isId(v.attempt_id)) return false;
  const o = v.outcome;
  return (o === "stored" || o === "duplicate" || o === "stale" || o === "unknown") && keyCount(v) === 2;
}

/** A body `{ [key]: [1..10,000 items each passing `item`] }` and nothing else. */
function isListOf(body: unknown, key: string, item: (v: unknown) => boolean): boolean {
  if (!isObject(body)) return false;
  const list = body[key];
  if (!Array.isArray(list) || list.length < 1 || list.length > 10_000 || keyCount(body) !== 1) return false;
  for (let i = 0; i < list.length; i++) if (!item(list[i])) return false;
  return true;
}

/**
 * Whether `body` surely passes `command`'s schema, proven without Ajv; false
 * for every command but STEP and ACK, and whenever the proof does not go through.
 */
export function isPlainBody(command: CommandName, body: unknown): boolean {
  if (command === "STEP") return isListOf(body, "steps", isStepDispatch);
  if (command === "ACK") return isListOf(body, "acks", isAckItem);
  return false;
}
