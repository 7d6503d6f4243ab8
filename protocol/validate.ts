/**
 * One compiled validator per command, built once from protocol/schemas/.
 * A compiled Ajv check costs ~0.1 us per message here, so every received body
 * is validated on both sides.
 */
import { Ajv2020, type ErrorObject, type ValidateFunction } from "ajv/dist/2020.js";
import { COMMAND_SCHEMAS, type CommandName } from "./constants";
import { fault, type ProtocolFault } from "./errors";
import { loadSchemaFiles, SCHEMA_ID_PREFIX } from "./schemaFiles";
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

export function validateBody<C extends CommandName>(command: C, body: unknown): Validation<C> {
  const fn = validatorFor(command);
  if (fn(body)) return { ok: true, body: body as BodyOf<C> };
  const err = pickError(fn.errors ?? []);
  const where = err?.instancePath || "(body)";
  const detail = err
    ? `${command} body: ${where} ${err.message ?? "is invalid"}`
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
