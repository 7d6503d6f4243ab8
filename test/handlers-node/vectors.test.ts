/**
 * protocol/vectors/ from the pool's side: a welcomed pool is sent every
 * invalid vector of the commands a broker sends (and every invalid raw-frame
 * vector) and must answer each with ERROR of the vector's error_code — except
 * an ERROR, which is never answered — then still run a step. Valid bodies of
 * ACK, CANCEL, HEARTBEAT and ERROR must get no ERROR at all.
 * (The codec's own round trips of every vector are in test/protocol/.)
 */
import { strict as assert } from "node:assert";
import { readFileSync } from "node:fs";
import { pino } from "pino";
import { HandlerPool } from "../../handlers-node";
import { BrokerCommands, SIGNATURE } from "../../protocol";
import { FakeBroker, stepFor } from "./support/fakeBroker";

interface BodyVector {
  name: string;
  body: Record<string, unknown>;
  error_code?: string;
}
interface FrameVector {
  name: string;
  frames: ({ text: string } | { hex: string })[];
  error_code: string;
}

const ACTIONS = new Set(["hello_required", "hello_rejected", "shutting_down"]);
const VECTORS = new URL("../../protocol/vectors/", import.meta.url);
const load = <T>(file: string): T => JSON.parse(readFileSync(new URL(file, VECTORS), "utf8")) as T;
const frameBytes = (f: { text: string } | { hex: string }): Buffer =>
  "text" in f ? Buffer.from(f.text, "utf8") : Buffer.from(f.hex, "hex");

describe("handlers-node against protocol/vectors", function () {
  let broker: FakeBroker;
  let pool: HandlerPool;

  beforeEach(async function () {
    broker = await FakeBroker.bind("inproc");
    pool = new HandlerPool({
      endpoint: broker.endpoint,
      poolId: "vectors",
      logger: pino({ level: "silent" }),
    });
    pool.handle("ok", () => "fine");
    const started = pool.start();
    await broker.handshake({ heartbeat_liveness: 100 });
    await started;
  });

  afterEach(async function () {
    await pool.close({ drainMs: 0, ackTimeoutMs: 0 });
    broker.close();
  });

  it("answers each invalid broker-command vector with its error code, and stays up", async function () {
    let expectedErrors = 0;
    for (const command of ["STEP", "ACK", "CANCEL", "HEARTBEAT", "DISCONNECT", "WELCOME", "ERROR"] as const) {
      const file = load<{ valid: BodyVector[]; invalid: BodyVector[] }>(`${command.toLowerCase()}.json`);
      for (const v of file.invalid) {
        await broker.sendRaw("vectors", [SIGNATURE, command, JSON.stringify(v.body)]);
        if (command === BrokerCommands.ERROR) continue; // never answered; checked by the count below
        expectedErrors++;
        const err = await broker.next("ERROR");
        assert.equal(err.body.code, v.error_code, `${command} vector "${v.name}"`);
        assert.equal(err.body.command, command, `${command} vector "${v.name}" names the command`);
      }
    }
    for (const command of ["ACK", "CANCEL", "HEARTBEAT", "ERROR"] as const) {
      for (const v of load<{ valid: BodyVector[] }>(`${command.toLowerCase()}.json`).valid) {
        // These codes make the pool say HELLO again or reconnect (tested on their own).
        if (command === "ERROR" && ACTIONS.has(String(v.body.code))) continue;
        await broker.sendRaw("vectors", [SIGNATURE, command, JSON.stringify(v.body)]);
      }
    }
    const s = stepFor("ok");
    await broker.send("vectors", "STEP", { steps: [s] });
    await broker.next("RESULT");
    assert.equal(
      broker.log.filter((m) => m.command === "ERROR").length,
      expectedErrors,
      "no ERROR for valid bodies or for ERRORs",
    );
  });

  it("answers each invalid frames vector with its error code", async function () {
    for (const v of load<{ invalid: FrameVector[] }>("frames.json").invalid) {
      await broker.sendRaw("vectors", v.frames.map(frameBytes));
      const err = await broker.next("ERROR");
      assert.equal(err.body.code, v.error_code, `frames vector "${v.name}"`);
    }
    const s = stepFor("ok");
    await broker.send("vectors", "STEP", { steps: [s] });
    await broker.next("RESULT");
  });
});
