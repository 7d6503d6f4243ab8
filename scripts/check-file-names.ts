/**
 * The layout guard `npm run check` runs (issue 14): a reader who opens
 * `foo.ts` must find `foo` there, and no file under broker/ grows past what a
 * maintainer can hold in mind.
 * - a PascalCase file exports a class, interface, type or enum of its name;
 * - a camelCase file exports a function, variable, type, interface or enum of its name;
 * - a file under broker/ has at most MAX_BROKER_LINES lines.
 * Entry and index files, generated files, and files another change is moving
 * are listed in EXCEPTIONS, each with its reason, so the list says why.
 *   tsx scripts/check-file-names.ts [--root <dir>]
 * --root checks another tree (the guard's own test) with no exceptions: the
 * list is this repository's.
 */
import { existsSync, readdirSync, readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import ts from "typescript";

/** The folders whose files are held to the rule (relative to the root). */
export const CHECKED_DIRS = ["broker", "handlers-node", "protocol", "bin"] as const;
export const MAX_BROKER_LINES = 450;

export type ExceptionKind = "name" | "lines";
export interface FileException {
  /** Which of the two rules the file is excused from. */
  readonly skip: readonly ExceptionKind[];
  readonly reason: string;
}

function topicModules(topics: Record<string, string>): Record<string, FileException> {
  return Object.fromEntries(
    Object.entries(topics).map(([file, topic]) => [file, { skip: ["name"], reason: `a module of ${topic}` }]),
  );
}

/** Relative paths (forward slashes) excused from a rule, and why. */
export const EXCEPTIONS: Readonly<Record<string, FileException>> = {
  "bin/stepbroker.ts": { skip: ["name"], reason: "the CLI entry point: it runs, it exports nothing" },
  "broker/db/embedded.ts": {
    skip: ["name"],
    reason: "index of the embedded server's parts: the one import path tests, bench and openDatabase use",
  },
  "broker/state/index.ts": { skip: ["name"], reason: "index of the state package" },
  "handlers-node/index.ts": { skip: ["name"], reason: "the Node SDK's package entry" },
  "protocol/index.ts": { skip: ["name"], reason: "the protocol package's entry" },
  "protocol/types.generated.ts": {
    skip: ["name"],
    reason: "generated from protocol/schemas/ by scripts/generate-types.ts",
  },
  // Named after their topic, with several exports of equal weight: one name would misname the rest.
  // Each is a candidate for a split or a rename when it is next changed for a reason of its own.
  ...topicModules({
    "broker/db/errors.ts": "the database error helpers",
    "broker/state/errors.ts": "the state manager's error classes",
    "handlers-node/errors.ts": "the SDK's error classes",
    "protocol/errors.ts": "the protocol's error helpers",
    "handlers-node/types.ts": "the SDK's public types",
    "broker/state/types.ts": "the state manager's public types",
    "protocol/constants.ts": "the protocol's constants",
    "protocol/bodies.ts": "the message body types",
    "broker/allowList.ts": "reading and reloading the CURVE allow-lists",
    "broker/roles.ts": "peer roles and what each may send",
    "broker/config.ts": "the broker's options and their defaults",
    "broker/db/embeddedCredentials.ts":
      "the embedded server's credentials file (also imported by test/state/embedded.test.ts)",
    "broker/db/identifiers.ts": "checking and quoting SQL identifiers",
    "broker/db/migrate.ts": "migrations and SQL functions",
    "broker/db/queries.ts": "the named SQL query files",
    "broker/db/transaction.ts": "running a statement or a transaction",
    "broker/state/explain.ts": "explaining a task's steps",
    "broker/state/rows.ts": "the database row types and their mappers",
    "broker/state/templates.ts": "template parsing and its error codes",
    "broker/state/transitions.ts": "the legal state moves",
    "broker/state/workListener.ts": "the LISTEN connection that reconnects",
    "handlers-node/version.ts": "the SDK's name and version",
    "protocol/codec.ts": "encoding and decoding frames",
    "protocol/curveKeys.ts": "CURVE key files",
    "protocol/msgpackStrings.ts": "scanning MessagePack for invalid strings",
    "protocol/schemaFiles.ts": "the JSON Schema files",
    "protocol/storableValues.ts": "what PostgreSQL can store",
    "handlers-node/client.ts": "the client API (StepbrokerClient, BrokerError): a public SDK path",
  }),
  // The right name is known, but the file is imported by a file being split, which no one else may edit now.
  "broker/db/logger.ts": {
    skip: ["name"],
    reason: "the logger type the database code shares; a module of the logging it expects",
  },
};

export interface Problem {
  readonly file: string;
  readonly message: string;
}

export interface CheckOptions {
  /** The folder holding broker/, handlers-node/, protocol/ and bin/. */
  readonly root: string;
  readonly exceptions?: Readonly<Record<string, FileException>>;
}

type ExportKind = "class" | "interface" | "type" | "enum" | "function" | "variable" | "namespace";

function hasExportModifier(node: ts.Node): boolean {
  return (
    ts.canHaveModifiers(node) &&
    (ts.getModifiers(node) ?? []).some((m) => m.kind === ts.SyntaxKind.ExportKeyword)
  );
}

/**
 * The names a module exports and what each is. A name re-exported from
 * another module (`export { x } from "./x"`) counts as exported here; its kind
 * is unknown without following the import, so it matches either rule.
 */
export function exportedNames(fileName: string, text: string): Map<string, ExportKind | "reexport"> {
  const source = ts.createSourceFile(fileName, text, ts.ScriptTarget.ES2022, false, ts.ScriptKind.TS);
  const names = new Map<string, ExportKind | "reexport">();
  for (const node of source.statements) {
    if (ts.isExportDeclaration(node)) {
      if (node.exportClause !== undefined && ts.isNamedExports(node.exportClause)) {
        for (const element of node.exportClause.elements) names.set(element.name.text, "reexport");
      }
      continue;
    }
    if (!hasExportModifier(node)) continue;
    if (ts.isClassDeclaration(node) && node.name) names.set(node.name.text, "class");
    else if (ts.isInterfaceDeclaration(node)) names.set(node.name.text, "interface");
    else if (ts.isTypeAliasDeclaration(node)) names.set(node.name.text, "type");
    else if (ts.isEnumDeclaration(node)) names.set(node.name.text, "enum");
    else if (ts.isFunctionDeclaration(node) && node.name) names.set(node.name.text, "function");
    else if (ts.isModuleDeclaration(node) && ts.isIdentifier(node.name))
      names.set(node.name.text, "namespace");
    else if (ts.isVariableStatement(node)) {
      for (const declaration of node.declarationList.declarations) {
        if (ts.isIdentifier(declaration.name)) names.set(declaration.name.text, "variable");
      }
    }
  }
  return names;
}

const PASCAL_KINDS: ReadonlySet<string> = new Set(["class", "interface", "type", "enum", "reexport"]);
const CAMEL_KINDS: ReadonlySet<string> = new Set([
  "function",
  "variable",
  "type",
  "interface",
  "enum",
  "namespace",
  "reexport",
]);

/** The problem with a file's name, or undefined when the name matches an export. */
export function nameProblem(relative: string, text: string): string | undefined {
  const base = path.basename(relative, ".ts");
  const names = exportedNames(relative, text);
  const kind = names.get(base);
  if (/^[A-Z][A-Za-z0-9]*$/.test(base)) {
    if (kind !== undefined && PASCAL_KINDS.has(kind)) return undefined;
    return `a PascalCase file must export a class, interface or type named ${base}${found(names)}`;
  }
  if (/^[a-z][A-Za-z0-9]*$/.test(base)) {
    if (kind !== undefined && CAMEL_KINDS.has(kind)) return undefined;
    return `a camelCase file must export a function, const or type named ${base}${found(names)}`;
  }
  return `the name ${base} is neither PascalCase nor camelCase: rename it after what it exports`;
}

function found(names: Map<string, string>): string {
  const list = [...names.keys()];
  return list.length === 0
    ? " (it exports nothing): rename it, or list it in EXCEPTIONS with the reason"
    : ` (it exports ${list.slice(0, 6).join(", ")}${list.length > 6 ? ", …" : ""}): rename the file after its main export, or list it in EXCEPTIONS with the reason`;
}

function tsFiles(dir: string): string[] {
  let entries;
  try {
    entries = readdirSync(dir, { withFileTypes: true });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return [];
    throw err;
  }
  return entries.flatMap((entry) => {
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) return entry.name === "node_modules" ? [] : tsFiles(full);
    return entry.isFile() && entry.name.endsWith(".ts") && !entry.name.endsWith(".d.ts") ? [full] : [];
  });
}

/** Every problem under the root's checked folders, sorted by file. */
export function checkFileNames(options: CheckOptions): Problem[] {
  const exceptions = options.exceptions ?? EXCEPTIONS;
  const problems: Problem[] = [];
  for (const dir of CHECKED_DIRS) {
    for (const full of tsFiles(path.join(options.root, dir))) {
      const file = path.relative(options.root, full).split(path.sep).join("/");
      const skip = exceptions[file]?.skip ?? [];
      const text = readFileSync(full, "utf8");
      if (!skip.includes("name")) {
        const message = nameProblem(file, text);
        if (message !== undefined) problems.push({ file, message });
      }
      if (dir === "broker" && !skip.includes("lines")) {
        const lines = text.split("\n").length - (text.endsWith("\n") ? 1 : 0);
        if (lines > MAX_BROKER_LINES) {
          problems.push({
            file,
            message: `${lines} lines, more than the ${MAX_BROKER_LINES} a file under broker/ may have: split it by what it does`,
          });
        }
      }
    }
  }
  // an exception whose file is gone would excuse the next file of that name without anyone noticing
  for (const file of Object.keys(exceptions)) {
    if (!existsSync(path.join(options.root, file))) {
      problems.push({ file, message: "listed in EXCEPTIONS but does not exist: remove the entry" });
    }
  }
  return problems.sort((a, b) => a.file.localeCompare(b.file));
}

function main(): void {
  const { values } = parseArgs({ options: { root: { type: "string" } } });
  const root = path.resolve(values.root ?? path.join(path.dirname(fileURLToPath(import.meta.url)), ".."));
  const problems = checkFileNames({ root, exceptions: values.root === undefined ? EXCEPTIONS : {} });
  for (const p of problems) process.stderr.write(`check-file-names: ${p.file}: ${p.message}\n`);
  if (problems.length > 0) {
    process.stderr.write(`check-file-names: ${problems.length} problem(s)\n`);
    process.exitCode = 1;
  }
}

if (process.argv[1] !== undefined && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main();
}
