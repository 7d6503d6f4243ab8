/**
 * One compiled validator per command, built once from protocol/schemas/.
 * A compiled Ajv check costs ~0.1 us per message here, so every received body
 * is validated on both sides; the bodies a pool gets once per step are first
 * tried by a hand-written check (isPlainBody) that is cheaper still.
 */
import { Ajv2020, type ErrorObject, type ValidateFunction } from "ajv/dist/2020.js";
import { COMMAND_SCHEMAS, ID_PATTERN, MAX_VALUE_DEPTH, type CommandName } from "./constants";
import { fault, type ProtocolFault } from "./errors";
import { isPlainBody } from "./isPlainBody";
import { loadSchemaFiles, SCHEMA_ID_PREFIX } from "./schemaFiles";
import { depthOf } from "./storableValues";
import type { BodyOf } from "./bodies";

let validators: Map<CommandName, ValidateFunction> | undefined;

function compileAll(): Map<CommandName, ValidateFunction> {
  const ajv = new Ajv2020({ allErrors: false, strict: true, strictRequired: false, allowUnionTypes: true });
  for (const { schema } of loadSchemaFiles()) ajv.addSchema(schema);
  const out = new Map<CommandName, ValidateFunction>();
  for (const [command, file] of Object.entries(COMMAND_SCHEMAS) as [CommandName, string][]) {
    const id = SCHEMA_ID_PREFIX + file.replace(/\.json$/, "");
    const fn = ajv.getSchema(id);
    if (!fn) throw new Error(`schema ${id} for ${command} is missing from protocol/schemas/`);
    out.set(command, fn);
  }
  return out;
}

function validatorFor(command: CommandName): ValidateFunction {
  validators ??= compileAll();
  return validators.get(command)!;
}

/** The most telling error: `if` failures only say which branch was taken. */
function pickError(errors: ErrorObject[]): ErrorObject | undefined {
  return errors.find((e) => e.keyword !== "if") ?? errors[0];
}

export type Validation<C extends CommandName> =
  { ok: true; body: BodyOf<C> } | { ok: false; fault: ProtocolFault };

/**
 * The free-form values a SUBMIT or RESULT brings in: the broker sends them on
 * deeper than they arrived (in STEP and REPLY), so each gets MAX_VALUE_DEPTH
 * levels of its own. A loop rather than a generator of (path, value) pairs:
 * this runs for every result, and the three paths each result's pairs built
 * were only needed for the rare fault.
 */
function valueDepthFault(command: CommandName, body: unknown): ProtocolFault | undefined {
  if (command === "SUBMIT") {
    const context = (body as { context?: unknown }).context;
    return tooDeep(context) ? depthFault(command, "/context") : undefined;
  }
  if (command !== "RESULT") return undefined;
  const results = (
    body as {
      results: { attempt_id: string; output?: unknown; usage?: unknown; error?: { details?: unknown } }[];
    }
  ).results;
  for (let i = 0; i < results.length; i++) {
    const r = results[i]!;
    if (tooDeep(r.output)) return depthFault(command, `/results/${i}/output`, r.attempt_id);
    if (tooDeep(r.usage)) return depthFault(command, `/results/${i}/usage`, r.attempt_id);
    if (tooDeep(r.error?.details)) return depthFault(command, `/results/${i}/error/details`, r.attempt_id);
  }
  return undefined;
}

function tooDeep(value: unknown): boolean {
  return value !== null && typeof value === "object" && depthOf(value, MAX_VALUE_DEPTH) > MAX_VALUE_DEPTH;
}

function depthFault(command: CommandName, path: string, attemptId?: string): ProtocolFault {
  return fault("too_deep", `${command} body: ${path} nests deeper than ${MAX_VALUE_DEPTH} levels`, {
    command,
    instancePath: path,
    ...(attemptId ? { attemptId } : {}),
  });
}

export function validateBody<C extends CommandName>(command: C, body: unknown): Validation<C> {
  const fn = validatorFor(command);
  // The hot shapes first (see isPlainBody): Ajv then only sees what that check could not prove.
  if (isPlainBody(command, body) || fn(body)) {
    const deep = valueDepthFault(command, body);
    return deep ? { ok: false, fault: deep } : { ok: true, body: body as BodyOf<C> };
  }
  const err = pickError(fn.errors ?? []);
  const where = err?.instancePath || "(body)";
  // "must NOT have additional properties" alone points at the parent object: name the field to fix.
  const extra =
    err?.keyword === "additionalProperties"
      ? (err.params as { additionalProperty?: unknown }).additionalProperty
      : undefined;
  const detail = err
    ? `${command} body: ${where} ${err.message ?? "is invalid"}${typeof extra === "string" ? `: ${JSON.stringify(extra)} is not a field here` : ""}`
    : `${command} body is invalid`;
  return {
    ok: false,
    fault: fault("schema_violation", detail, {
      command,
      schemaPath: err?.schemaPath ?? "",
      instancePath: err?.instancePath ?? "",
    }),
  };
}

/** What a RESULT that failed validation as a whole still carries: its valid items, and why each other one failed. */
export interface SalvagedResults {
  results: BodyOf<"RESULT">["results"];
  /** One fault per invalid item, with the item's `attempt_id` when it has a readable one. */
  refused: ProtocolFault[];
}

/**
 * A RESULT whose body failed validation because of some of its items is
 * judged item by item, so one bad item does not hold back the others: each
 * item is validated as a RESULT of its own (paths renamed to its index).
 * Undefined when the envelope itself is wrong (not an object of `results`
 * only, or not 1..10,000 items): then the whole message is refused.
 */
export function salvageResults(body: unknown): SalvagedResults | undefined {
  if (typeof body !== "object" || body === null || Array.isArray(body)) return undefined;
  const keys = Object.keys(body);
  const items = (body as { results?: unknown }).results;
  if (keys.length !== 1 || !Array.isArray(items) || items.length < 1 || items.length > 10_000)
    return undefined;
  const results: BodyOf<"RESULT">["results"] = [];
  const refused: ProtocolFault[] = [];
  items.forEach((item: unknown, i) => {
    const one = validateBody("RESULT", { results: [item] });
    if (one.ok) {
      results.push(one.body.results[0]!);
      return;
    }
    const attemptId = (item as { attempt_id?: unknown } | null)?.attempt_id;
    const rename = (p: string | undefined): string | undefined =>
      p?.replace(/^\/results\/0(?=\/|$)/, `/results/${i}`);
    refused.push({
      ...one.fault,
      message: one.fault.message.replace(/\/results\/0(?=\/| )/, `/results/${i}`),
      ...(one.fault.instancePath !== undefined ? { instancePath: rename(one.fault.instancePath) ?? "" } : {}),
      ...(typeof attemptId === "string" && ID_PATTERN.test(attemptId) ? { attemptId } : {}),
    });
  });
  return { results, refused };
}
