/**
 * Template loading and validation: a JSON Schema check (template.schema.json,
 * which also fills in every default), then the graph checks a schema cannot
 * express. Every problem names what is wrong and where, e.g.
 * `step "ship_order" depends on unknown step "pay" (steps[3].depends_on[0])`.
 */
import { readFileSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { Ajv2020, type ErrorObject, type ValidateFunction } from "ajv/dist/2020.js";
import { parse as parseYaml } from "yaml";
import { coerceError } from "../db/errors";
import type { TemplateDefinition } from "./types";

/**
 * Stable codes of template problems. `template_conflict`: the namespace/name/
 * version is registered with a different definition (versions are immutable).
 */
export const TemplateErrorCodes = {
  SCHEMA: "template_schema",
  EMPTY: "template_empty",
  DUPLICATE_STEP: "template_duplicate_step",
  UNKNOWN_DEPENDENCY: "template_unknown_dependency",
  CYCLE: "template_cycle",
  CONFLICT: "template_conflict",
  UNREADABLE: "template_unreadable",
  TOO_MANY_EDGES: "template_too_many_edges",
} as const;
export type TemplateErrorCode = (typeof TemplateErrorCodes)[keyof typeof TemplateErrorCodes];

/** Most steps in one template (template.schema.json says the same in steps.maxItems). */
export const MAX_TEMPLATE_STEPS = 1000;
/**
 * Most dependency edges in one template, counted over every depends_on list.
 * Each edge is a row written per task and a counter decremented when its
 * parent finishes, so a template linking every step to every earlier one
 * (499,500 edges at 1,000 steps) made each SUBMIT a 40 s write; 10,000 keeps a
 * task at the step limit a bounded write while allowing ten parents per step.
 */
export const MAX_TEMPLATE_EDGES = 10_000;

export interface TemplateProblem {
  code: TemplateErrorCode;
  /** Where in the template, e.g. "steps[3].depends_on[0]" ("" for the whole template). */
  path: string;
  message: string;
}

/** A template was refused. `code` is the first problem's; `problems` lists them all. */
export class TemplateError extends Error {
  override readonly name = "TemplateError";
  readonly code: TemplateErrorCode;
  readonly problems: TemplateProblem[];

  constructor(template: string, problems: TemplateProblem[], options?: { cause?: Error }) {
    const first = problems[0];
    if (first === undefined) throw new Error("TemplateError needs at least one problem");
    super(`template ${template} is invalid: ${problems.map((p) => p.message).join("; ")}`, options);
    this.code = first.code;
    this.problems = problems;
  }
}

// Compiled on first use, not at import: every CLI command imports this module,
// and most of them (status, explain, pools) never check a template; the
// compile is about a quarter of a second of a command's start.
let compiled: ValidateFunction<TemplateDefinition> | undefined;
function templateValidator(): ValidateFunction<TemplateDefinition> {
  if (compiled) return compiled;
  const schema: unknown = JSON.parse(
    readFileSync(new URL("./template.schema.json", import.meta.url), "utf8"),
  );
  const ajv = new Ajv2020({ allErrors: true, useDefaults: true, strict: true });
  compiled = ajv.compile<TemplateDefinition>(schema as object);
  return compiled;
}

/** "/steps/3/depends_on/0" -> "steps[3].depends_on[0]" */
function jsonPointerToPath(pointer: string): string {
  let out = "";
  for (const part of pointer.split("/").slice(1)) {
    const key = part.replace(/~1/g, "/").replace(/~0/g, "~");
    out += /^\d+$/.test(key) ? `[${key}]` : out === "" ? key : `.${key}`;
  }
  return out;
}

function schemaProblem(error: ErrorObject): TemplateProblem {
  const path = jsonPointerToPath(error.instancePath);
  let message = error.message ?? "is invalid";
  if (error.keyword === "additionalProperties") {
    const extra = String((error.params as { additionalProperty?: unknown }).additionalProperty);
    message = `has unknown property "${extra}"`;
  } else if (error.keyword === "required") {
    const missing = String((error.params as { missingProperty?: unknown }).missingProperty);
    message = `is missing required property "${missing}"`;
  }
  const where = path === "" ? "the template" : path;
  return { code: TemplateErrorCodes.SCHEMA, path, message: `${where} ${message}` };
}

function describe(input: unknown): string {
  if (input !== null && typeof input === "object") {
    const t = input as { namespace?: unknown; name?: unknown; version?: unknown };
    if (typeof t.namespace === "string" && typeof t.name === "string") {
      return `${t.namespace}/${t.name}${typeof t.version === "string" ? `@${t.version}` : ""}`;
    }
  }
  return "(unnamed)";
}

/** depends_on entries over all steps of a template not yet validated (lists that are not arrays count nothing). */
function rawEdgeCount(input: unknown): number {
  const steps = (input as { steps?: unknown } | null)?.steps;
  if (!Array.isArray(steps)) return 0;
  let n = 0;
  for (const step of steps) {
    const deps = (step as { depends_on?: unknown } | null)?.depends_on;
    if (Array.isArray(deps)) n += deps.length;
  }
  return n;
}

function edgeProblem(edges: number): TemplateProblem | undefined {
  if (edges <= MAX_TEMPLATE_EDGES) return undefined;
  return {
    code: TemplateErrorCodes.TOO_MANY_EDGES,
    path: "steps",
    message:
      `the template has ${edges} dependency edges (depends_on entries over all steps); the limit is ${MAX_TEMPLATE_EDGES}: ` +
      "depend on fewer steps, e.g. on one step that joins a group instead of on every step of the group",
  };
}

/** The graph checks: at least one step, unique names, known dependencies, no cycle. */
function graphProblems(def: TemplateDefinition): TemplateProblem[] {
  const problems: TemplateProblem[] = [];
  if (def.steps.length === 0) {
    return [{ code: TemplateErrorCodes.EMPTY, path: "steps", message: "the template has no steps (steps)" }];
  }
  const index = new Map<string, number>();
  def.steps.forEach((step, i) => {
    const earlier = index.get(step.name);
    if (earlier !== undefined) {
      problems.push({
        code: TemplateErrorCodes.DUPLICATE_STEP,
        path: `steps[${i}].name`,
        message: `step name "${step.name}" is used twice (steps[${earlier}].name and steps[${i}].name)`,
      });
    } else {
      index.set(step.name, i);
    }
  });
  def.steps.forEach((step, i) => {
    step.depends_on.forEach((dep, j) => {
      if (!index.has(dep)) {
        problems.push({
          code: TemplateErrorCodes.UNKNOWN_DEPENDENCY,
          path: `steps[${i}].depends_on[${j}]`,
          message: `step "${step.name}" depends on unknown step "${dep}" (steps[${i}].depends_on[${j}])`,
        });
      }
    });
  });
  if (problems.length > 0) return problems;

  const edges = edgeProblem(def.steps.reduce((n, step) => n + step.depends_on.length, 0));
  if (edges) return [edges];

  // Depth-first search; a grey node met again closes a cycle.
  const colour = new Map<string, "grey" | "black">();
  const stack: string[] = [];
  const visit = (name: string): string[] | undefined => {
    colour.set(name, "grey");
    stack.push(name);
    const i = index.get(name) ?? 0;
    for (const dep of def.steps[i]?.depends_on ?? []) {
      const c = colour.get(dep);
      if (c === "grey") return [...stack.slice(stack.indexOf(dep)), dep];
      if (c === undefined) {
        const cycle = visit(dep);
        if (cycle !== undefined) return cycle;
      }
    }
    stack.pop();
    colour.set(name, "black");
    return undefined;
  };
  for (const step of def.steps) {
    if (colour.has(step.name)) continue;
    const cycle = visit(step.name);
    if (cycle !== undefined) {
      // cycle lists a -> depends on -> b ...; show it in dependency order and point at the first edge
      const first = cycle[0] ?? step.name;
      const second = cycle[1] ?? first;
      const i = index.get(first) ?? 0;
      const j = def.steps[i]?.depends_on.indexOf(second) ?? 0;
      problems.push({
        code: TemplateErrorCodes.CYCLE,
        path: `steps[${i}].depends_on[${j}]`,
        message: `steps depend on each other in a cycle: ${cycle.map((n) => `"${n}"`).join(" depends on ")} (steps[${i}].depends_on[${j}])`,
      });
      break;
    }
  }
  return problems;
}

/** Positions (0-based) of each dependency edge's child and parent, in the order the steps list them. */
export function templateEdges(def: TemplateDefinition): { child: number[]; parent: number[] } {
  const index = new Map(def.steps.map((step, i) => [step.name, i]));
  const child: number[] = [];
  const parent: number[] = [];
  def.steps.forEach((step, i) => {
    for (const dep of step.depends_on) {
      const p = index.get(dep);
      if (p === undefined) throw new Error(`step "${step.name}" depends on unknown step "${dep}"`);
      child.push(i);
      parent.push(p);
    }
  });
  return { child, parent };
}

/**
 * Validates a template and returns it normalized (a copy, with every default
 * filled in). Throws TemplateError naming each problem.
 */
export function validateTemplate(input: unknown): TemplateDefinition {
  // Counted before the schema check, whose uniqueItems rule costs the square of each depends_on list:
  // a template far over the edge limit is refused without that work.
  const edges = edgeProblem(rawEdgeCount(input));
  if (edges) throw new TemplateError(describe(input), [edges]);
  const copy: unknown = structuredClone(input);
  const validateSchema = templateValidator();
  if (!validateSchema(copy)) {
    throw new TemplateError(describe(input), (validateSchema.errors ?? []).map(schemaProblem));
  }
  const problems = graphProblems(copy);
  if (problems.length > 0) throw new TemplateError(describe(input), problems);
  return copy;
}

/** Parses template text: YAML (a superset of JSON) unless the format says JSON. */
export function parseTemplate(text: string, format: "json" | "yaml" = "yaml"): unknown {
  return format === "json" ? (JSON.parse(text) as unknown) : (parseYaml(text) as unknown);
}

/** Reads and validates a template file (.json, .yaml or .yml). */
export async function loadTemplateFile(file: string): Promise<TemplateDefinition> {
  let parsed: unknown;
  try {
    parsed = parseTemplate(await readFile(file, "utf8"), file.endsWith(".json") ? "json" : "yaml");
  } catch (thrown) {
    const err = coerceError(thrown);
    throw new TemplateError(
      file,
      [{ code: TemplateErrorCodes.UNREADABLE, path: "", message: `cannot read ${file}: ${err.message}` }],
      { cause: err },
    );
  }
  return validateTemplate(parsed);
}
