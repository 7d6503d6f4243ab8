/**
 * The layout guard (scripts/check-file-names.ts) on a temporary tree: it
 * passes files named after what they export, and names every file that is
 * not, or that is too long under broker/, unless an exception says why.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import { MAX_BROKER_LINES, checkFileNames } from "../../scripts/check-file-names";

const SCRIPT = new URL("../../scripts/check-file-names.ts", import.meta.url).pathname;

const GOOD: Record<string, string> = {
  "broker/LeaseReaper.ts": "export class LeaseReaper {}\n",
  "broker/leaseTimer.ts": "export function leaseTimer(): number { return 1; }\n",
  "broker/db/defaultSchema.ts": 'export const defaultSchema = "stepbroker";\n',
  "protocol/StepBody.ts": "export interface StepBody { step_id: string }\n",
  "protocol/stepId.ts": "export type stepId = string;\n",
  "handlers-node/Pool.ts": 'export { Pool } from "./impl";\n',
  // exactly at the limit: allowed
  "broker/atLimit.ts": `export const atLimit = 1;\n${"//\n".repeat(MAX_BROKER_LINES - 1)}`,
  // outside the checked folders: not looked at
  "bench/whatever.ts": "export const other = 1;\n",
};

const BAD: Record<string, string> = {
  // PascalCase name, but only a function of that name: a class or type was promised
  "broker/Dispatcher.ts": "export function Dispatcher(): void {}\n",
  // camelCase name exporting something else
  "broker/dispatch.ts": "export function claimSteps(): void {}\n",
  // a non-exported declaration of the name does not count
  "protocol/codecs.ts": "function codecs(): void {}\nexport const other = codecs;\n",
  "bin/run-it.ts": "export const runIt = 1;\n",
  // right name, too long
  "broker/overLimit.ts": `export const overLimit = 1;\n${"//\n".repeat(MAX_BROKER_LINES)}`,
};

function writeTree(root: string, files: Record<string, string>): void {
  for (const [file, text] of Object.entries(files)) {
    mkdirSync(path.dirname(path.join(root, file)), { recursive: true });
    writeFileSync(path.join(root, file), text);
  }
}

describe("the file-name and file-length guard", function () {
  this.timeout(30_000);
  let root: string;
  beforeEach(() => {
    root = mkdtempSync(path.join(os.tmpdir(), "sb-names-"));
  });
  afterEach(() => rmSync(root, { recursive: true, force: true }));

  it("passes a tree whose files are named after what they export", () => {
    writeTree(root, GOOD);
    assert.deepEqual(checkFileNames({ root, exceptions: {} }), []);
  });

  it("names each file that breaks a rule, and why", () => {
    writeTree(root, { ...GOOD, ...BAD });
    const problems = checkFileNames({ root, exceptions: {} });
    assert.deepEqual(
      problems.map((p) => p.file),
      [
        "bin/run-it.ts",
        "broker/dispatch.ts",
        "broker/Dispatcher.ts",
        "broker/overLimit.ts",
        "protocol/codecs.ts",
      ],
    );
    const message = (file: string) => problems.find((p) => p.file === file)?.message ?? "";
    assert.match(
      message("broker/Dispatcher.ts"),
      /PascalCase file must export a class, interface or type named Dispatcher/,
    );
    assert.match(message("broker/dispatch.ts"), /named dispatch \(it exports claimSteps\)/);
    assert.match(message("bin/run-it.ts"), /neither PascalCase nor camelCase/);
    assert.match(
      message("broker/overLimit.ts"),
      new RegExp(`${MAX_BROKER_LINES + 1} lines, more than the ${MAX_BROKER_LINES}`),
    );
  });

  it("excuses a listed file from the listed rule only, and refuses an entry for a file that is gone", () => {
    writeTree(root, { ...GOOD, ...BAD });
    const problems = checkFileNames({
      root,
      exceptions: {
        "broker/dispatch.ts": { skip: ["name"], reason: "test" },
        "bin/run-it.ts": { skip: ["name"], reason: "test" },
        "protocol/codecs.ts": { skip: ["name"], reason: "test" },
        // excused from the length rule only: its name is still checked, and is fine
        "broker/overLimit.ts": { skip: ["lines"], reason: "test" },
        // excused from the length rule only: its name still breaks the rule
        "broker/Dispatcher.ts": { skip: ["lines"], reason: "test" },
        "broker/gone.ts": { skip: ["name"], reason: "test" },
      },
    });
    assert.deepEqual(
      problems.map((p) => [p.file, p.message.slice(0, 40)]),
      [
        ["broker/Dispatcher.ts", "a PascalCase file must export a class, i"],
        ["broker/gone.ts", "listed in EXCEPTIONS but does not exist:"],
      ],
    );
  });

  it("as a command, exits 1 and prints each problem; exits 0 on a good tree", async () => {
    const run = promisify(execFile);
    // Two trees, so the two runs (a tsx start each) go side by side.
    const good = path.join(root, "good");
    const bad = path.join(root, "bad");
    writeTree(good, GOOD);
    writeTree(bad, BAD);
    const goodRun = run(process.execPath, ["--import", "tsx", SCRIPT, "--root", good], { timeout: 20_000 });
    const badRun = run(process.execPath, ["--import", "tsx", SCRIPT, "--root", bad], { timeout: 20_000 });
    const [goodOut] = await Promise.allSettled([goodRun, badRun]);
    assert.equal(goodOut.status, "fulfilled", String((goodOut as PromiseRejectedResult).reason));
    assert.equal(goodOut.value.stderr, "");
    await assert.rejects(badRun, (err: { code?: number; stderr?: string }) => {
      assert.equal(err.code, 1);
      assert.match(err.stderr ?? "", /check-file-names: broker\/dispatch\.ts: a camelCase file/);
      assert.match(err.stderr ?? "", /check-file-names: 5 problem\(s\)/);
      return true;
    });
  });
});
