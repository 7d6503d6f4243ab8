/**
 * The codec's promises: decoding never throws, whatever arrives; limits and
 * the accepted-command set are honoured; the body's first byte picks the
 * encoding; and MessagePack bodies are plain maps any library can write.
 */
import { strict as assert } from "node:assert";
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { Packr } from "msgpackr";
import {
  BrokerCommands,
  COMMAND_NAMES,
  ERROR_CODES,
  MAX_DEPTH,
  MAX_MESSAGE_BYTES,
  MAX_VALUE_DEPTH,
  PoolCommands,
  SIGNATURE,
  type CommandName,
} from "../../protocol/constants";
import {
  decodeBody,
  decodeMessage,
  encodeBody,
  encodeMessage,
  scanJson,
  sniffEncoding,
  type Decoded,
} from "../../protocol/codec";
import { valueProblem } from "../../protocol/storableValues";
import { firstInvalidUtf8String } from "../../protocol/msgpackStrings";
import { validateBody } from "../../protocol/validateBody";

const VECTOR_DIR = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "protocol", "vectors");
const SIG = Buffer.from(SIGNATURE);
const txt = (s: string): Buffer => Buffer.from(s, "utf8");
const hex = (h: string): Buffer => Buffer.from(h.replace(/\s+/g, ""), "hex");
const frames = (command: string, body: Uint8Array): Buffer[] => [SIG, txt(command), Buffer.from(body)];

/** Valid bodies from the vector files: realistic seeds for the fuzzer and the encoders below. */
const seeds: { command: CommandName; body: Record<string, unknown> }[] = COMMAND_NAMES.flatMap((command) => {
  const file = join(VECTOR_DIR, `${command.toLowerCase()}.json`);
  const parsed = JSON.parse(readFileSync(file, "utf8")) as { valid: { body: Record<string, unknown> }[] };
  return parsed.valid.map(({ body }) => ({ command, body }));
});

function bodyOf(r: Decoded): Record<string, unknown> {
  assert.ok(r.ok, r.ok ? "" : `${r.fault.code}: ${r.fault.message}`);
  return r.message.body as unknown as Record<string, unknown>;
}

function faultOf(r: Decoded): Extract<Decoded, { ok: false }>["fault"] {
  assert.ok(!r.ok, "the message was accepted");
  return r.fault;
}

// ---- a deterministic PRNG (mulberry32) ----------------------------------------------------

function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// ---- an independent MessagePack writer and a strict reader -----------------------------------
// Written from the MessagePack spec alone, to prove the broker's codec interoperates with a
// library that is not msgpackr: the writer makes different (still valid) choices than msgpackr
// (map16, str16, array16, 64-bit integers); the reader refuses anything PROTOCOL.md rules out.

function handPack(v: unknown, out: number[] = []): number[] {
  const u16 = (n: number) => out.push((n >> 8) & 0xff, n & 0xff);
  if (v === null) out.push(0xc0);
  else if (v === false) out.push(0xc2);
  else if (v === true) out.push(0xc3);
  else if (typeof v === "number") {
    const b = Buffer.alloc(9);
    if (Number.isSafeInteger(v)) {
      b[0] = v < 0 ? 0xd3 : 0xcf; // int64 / uint64, whatever the size
      if (v < 0) b.writeBigInt64BE(BigInt(v), 1);
      else b.writeBigUInt64BE(BigInt(v), 1);
    } else {
      b[0] = 0xcb; // float64
      b.writeDoubleBE(v, 1);
    }
    out.push(...b);
  } else if (typeof v === "string") {
    const s = Buffer.from(v, "utf8");
    out.push(0xda); // str16, even for short strings
    u16(s.length);
    out.push(...s);
  } else if (Array.isArray(v)) {
    out.push(0xdc); // array16
    u16(v.length);
    for (const x of v) handPack(x, out);
  } else if (typeof v === "object") {
    const entries = Object.entries(v as Record<string, unknown>);
    out.push(0xde); // map16
    u16(entries.length);
    for (const [k, x] of entries) {
      handPack(k, out);
      handPack(x, out);
    }
  } else throw new Error(`cannot pack ${typeof v}`);
  return out;
}

/** Reads the MessagePack subset PROTOCOL.md allows; throws on extension types, binary and non-string keys. */
function strictUnpack(buf: Buffer): unknown {
  let p = 0;
  // byte -> [size, read at offset]
  const scalars: Record<number, [number, (at: number) => number]> = {
    0xca: [4, (at) => buf.readFloatBE(at)],
    0xcb: [8, (at) => buf.readDoubleBE(at)],
    0xcc: [1, (at) => buf.readUInt8(at)],
    0xcd: [2, (at) => buf.readUInt16BE(at)],
    0xce: [4, (at) => buf.readUInt32BE(at)],
    0xcf: [8, (at) => Number(buf.readBigUInt64BE(at))],
    0xd0: [1, (at) => buf.readInt8(at)],
    0xd1: [2, (at) => buf.readInt16BE(at)],
    0xd2: [4, (at) => buf.readInt32BE(at)],
    0xd3: [8, (at) => Number(buf.readBigInt64BE(at))],
  };
  // byte -> [width of the length, what follows]
  const containers: Record<number, [1 | 2 | 4, "str" | "arr" | "map"]> = {
    0xd9: [1, "str"],
    0xda: [2, "str"],
    0xdb: [4, "str"],
    0xdc: [2, "arr"],
    0xdd: [4, "arr"],
    0xde: [2, "map"],
    0xdf: [4, "map"],
  };
  const str = (n: number): string => {
    const s = buf.toString("utf8", p, p + n);
    p += n;
    return s;
  };
  const map = (n: number): Record<string, unknown> => {
    const o: Record<string, unknown> = {};
    for (let i = 0; i < n; i++) {
      const k = read();
      if (typeof k !== "string") throw new Error(`map key at ${p} is not a string`);
      o[k] = read();
    }
    return o;
  };
  const arr = (n: number): unknown[] => Array.from({ length: n }, () => read());
  const read = (): unknown => {
    const b = buf[p++];
    if (b === undefined) throw new Error("truncated");
    if (b <= 0x7f) return b;
    if (b >= 0xe0) return b - 0x100;
    if (b >= 0x80 && b <= 0x8f) return map(b & 0x0f);
    if (b >= 0x90 && b <= 0x9f) return arr(b & 0x0f);
    if (b >= 0xa0 && b <= 0xbf) return str(b & 0x1f);
    if (b === 0xc0) return null;
    if (b === 0xc2 || b === 0xc3) return b === 0xc3;
    const at = p;
    const scalar = scalars[b];
    if (scalar) {
      p += scalar[0];
      return scalar[1](at);
    }
    const sized = containers[b];
    if (!sized)
      throw new Error(`byte 0x${b.toString(16)} at ${at - 1} (extension, binary or reserved) is not allowed`);
    const [width, kind] = sized;
    const n = width === 1 ? buf.readUInt8(at) : width === 2 ? buf.readUInt16BE(at) : buf.readUInt32BE(at);
    p += width;
    return kind === "str" ? str(n) : kind === "arr" ? arr(n) : map(n);
  };
  const v = read();
  if (p !== buf.length) throw new Error(`${buf.length - p} bytes after the body`);
  return v;
}

function assertPlainData(v: unknown, path = ""): void {
  if (v === null || typeof v === "string" || typeof v === "number" || typeof v === "boolean") return;
  if (Array.isArray(v)) {
    assert.equal(Object.getPrototypeOf(v), Array.prototype, `${path} is not a plain array`);
    v.forEach((x, i) => assertPlainData(x, `${path}/${i}`));
    return;
  }
  assert.ok(!(v instanceof Map), `${path} decoded as a Map`);
  assert.equal(Object.getPrototypeOf(v), Object.prototype, `${path} is not a plain object`);
  for (const [k, x] of Object.entries(v as Record<string, unknown>)) assertPlainData(x, `${path}/${k}`);
}

// ---- tests ------------------------------------------------------------------------------

describe("protocol codec", () => {
  describe("decodeMessage on bad input", () => {
    const ITERATIONS = 5000;
    const SEED = 0x5eb0_0c3e;
    const knownCodes = new Set<string>(ERROR_CODES);

    it(`returns a fault with a known code, and never throws, for ${ITERATIONS} random and mutated messages (seed ${SEED})`, () => {
      const rnd = prng(SEED);
      const int = (n: number) => Math.floor(rnd() * n);
      const pick = <T>(xs: readonly T[]): T => xs[int(xs.length)]!;
      const bytes = (n: number) => Buffer.from(Array.from({ length: n }, () => int(256)));
      const commands = [...COMMAND_NAMES, "FOO", "hello", "", "HELLO\u0000", "STEP ", "ÿ"];
      const signatures = [SIGNATURE, SIGNATURE, SIGNATURE, "stepbroker/2", "stepbroker/", "", "zmtp/3.1"];

      function mutate(buf: Buffer): Buffer {
        const b = Buffer.from(buf);
        switch (int(5)) {
          case 0: // flip a few bytes
            for (let i = 0, n = 1 + int(4); i < n && b.length; i++) b[int(b.length)] = int(256);
            return b;
          case 1: // truncate
            return b.subarray(0, int(b.length + 1));
          case 2: {
            // insert random bytes
            const at = int(b.length + 1);
            return Buffer.concat([b.subarray(0, at), bytes(1 + int(8)), b.subarray(at)]);
          }
          case 3: // append garbage
            return Buffer.concat([b, bytes(1 + int(4))]);
          default: // splice the start of another body
            return Buffer.concat([b.subarray(0, int(b.length + 1)), encodeBody(pick(seeds).body, "msgpack")]);
        }
      }

      function mutateValue(v: unknown, depth = 0): unknown {
        const replacements = [null, -1, 0, 1.5, 2 ** 53, "", "x".repeat(300), [], {}, true, "NOT-A-UUID"];
        if (depth > 4 || v === null || typeof v !== "object") return pick(replacements);
        const copy: Record<string, unknown> | unknown[] = Array.isArray(v) ? [...v] : { ...(v as object) };
        const keys = Object.keys(copy);
        if (!keys.length || rnd() < 0.2) {
          (copy as Record<string, unknown>)[pick(["extra", "0", "attempt_id", "status"])] =
            pick(replacements);
          return copy;
        }
        const k = pick(keys);
        const rec = copy as Record<string, unknown>;
        if (rnd() < 0.25) delete rec[k];
        else rec[k] = rnd() < 0.5 ? mutateValue(rec[k], depth + 1) : pick(replacements);
        return copy;
      }

      function randomMessage(): Buffer[] {
        const seed = pick(seeds);
        switch (int(6)) {
          case 0: // any number of random frames
            return Array.from({ length: int(6) }, () => bytes(int(40)));
          case 1: // right framing, random body bytes
            return frames(pick(commands), bytes(int(64)));
          case 2: // random body that starts like JSON or MessagePack
            return frames(
              seed.command,
              Buffer.concat([Buffer.from([pick([0x7b, 0x20, 0x80, 0x8f, 0xde, 0xdf])]), bytes(int(64))]),
            );
          case 3: // a valid body, its bytes mutated
            return frames(seed.command, mutate(encodeBody(seed.body, pick(["json", "msgpack"] as const))));
          case 4: // a valid body, its values mutated (mostly schema violations)
            return frames(
              seed.command,
              encodeBody(mutateValue(seed.body), pick(["json", "msgpack"] as const)),
            );
          default: // odd signature or command around a valid body
            return [txt(pick(signatures)), txt(pick(commands)), encodeBody(seed.body, "json")];
        }
      }

      const seen = new Map<string, number>();
      for (let i = 0; i < ITERATIONS; i++) {
        const msg = randomMessage();
        let r: Decoded;
        try {
          r = decodeMessage(msg);
        } catch (e) {
          assert.fail(
            `iteration ${i} threw ${String(e)} on frames ${msg.map((f) => f.toString("hex")).join(" | ")}`,
          );
        }
        if (r.ok) {
          seen.set("ok", (seen.get("ok") ?? 0) + 1);
          continue;
        }
        const { code, message } = r.fault;
        assert.ok(knownCodes.has(code), `iteration ${i}: unknown code ${code}`);
        assert.ok(typeof message === "string" && message.length > 0, `iteration ${i}: empty message`);
        if (code === "schema_violation") {
          assert.equal(typeof r.fault.instancePath, "string");
          assert.ok(r.fault.schemaPath?.includes("#"), `iteration ${i}: schema_violation without schemaPath`);
        }
        seen.set(code, (seen.get(code) ?? 0) + 1);
      }
      // The fuzzer reaches every stage of decoding, not just the first check.
      for (const code of [
        "malformed_frame",
        "unsupported_version",
        "unknown_command",
        "undecodable_body",
        "schema_violation",
        "ok",
      ]) {
        assert.ok(
          (seen.get(code) ?? 0) > 0,
          `the fuzzer never produced ${code}: ${JSON.stringify([...seen])}`,
        );
      }
    });

    it("treats command frames named like Object.prototype members as unknown commands instead of throwing", () => {
      for (const command of ["toString", "constructor", "__proto__", "hasOwnProperty", "valueOf"]) {
        let r: Decoded | undefined;
        assert.doesNotThrow(() => {
          r = decodeMessage(frames(command, txt("{}")));
        }, `command ${command}`);
        assert.equal(faultOf(r!).code, "unknown_command", `command ${command}`);
      }
    });

    it("answers zero frames with malformed_frame", () => {
      assert.equal(faultOf(decodeMessage([])).code, "malformed_frame");
    });
  });

  describe("message size limit", () => {
    const body = (size: number): Buffer => {
      const b = Buffer.from(JSON.stringify({ reason: "x".repeat(size - 13) }));
      assert.equal(b.length, size);
      return b;
    };

    it("accepts a body of exactly maxBytes and refuses one byte more with message_too_large", () => {
      assert.deepEqual(bodyOf(decodeMessage(frames("DISCONNECT", body(100)), { maxBytes: 100 })), {
        reason: "x".repeat(87),
      });
      const f = faultOf(decodeMessage(frames("DISCONNECT", body(101)), { maxBytes: 100 }));
      assert.equal(f.code, "message_too_large");
      assert.equal(f.command, "DISCONNECT");
      assert.match(f.message, /101 bytes; the limit is 100/);
    });

    it("applies MAX_MESSAGE_BYTES (1 MiB) when no maxBytes is given", () => {
      assert.ok(decodeMessage(frames("DISCONNECT", body(1000))).ok);
      const f = faultOf(decodeMessage(frames("DISCONNECT", Buffer.alloc(MAX_MESSAGE_BYTES + 1, 0x20))));
      assert.equal(f.code, "message_too_large");
    });

    it("counts bytes, not characters, and checks the size before parsing the body", () => {
      const multiByte = Buffer.from(JSON.stringify({ reason: "€".repeat(40) })); // 40 chars, 120 bytes of text
      assert.equal(
        faultOf(decodeMessage(frames("DISCONNECT", multiByte), { maxBytes: 100 })).code,
        "message_too_large",
      );
      const garbage = Buffer.alloc(200, 0xff);
      assert.equal(
        faultOf(decodeMessage(frames("HEARTBEAT", garbage), { maxBytes: 100 })).code,
        "message_too_large",
      );
      assert.equal(faultOf(decodeMessage(frames("HEARTBEAT", garbage))).code, "undecodable_body");
    });
  });

  describe("accepted commands", () => {
    const poolSide = new Set<string>(Object.values(BrokerCommands)); // what a pool accepts
    const brokerSide = new Set<string>([
      ...Object.values(PoolCommands),
      "SUBMIT",
      "STATUS",
      "WAIT",
      "CANCEL_TASK",
      "POOLS",
    ]);

    it("answers a protocol command outside the accept set with unknown_command", () => {
      const f = faultOf(decodeMessage(frames("HELLO", txt("{}")), { accept: poolSide }));
      assert.equal(f.code, "unknown_command");
      assert.equal(
        faultOf(decodeMessage(frames("STEP", txt('{"steps":[]}')), { accept: brokerSide })).code,
        "unknown_command",
      );
      assert.equal(
        faultOf(decodeMessage(frames("REPLY", txt('{"request_id":"r"}')), { accept: brokerSide })).code,
        "unknown_command",
      );
    });

    it("decodes commands in the accept set as usual", () => {
      assert.deepEqual(
        bodyOf(decodeMessage(frames("HEARTBEAT", txt('{"in_flight":1}')), { accept: poolSide })),
        { in_flight: 1 },
      );
      const r = decodeMessage(frames("HEARTBEAT", txt("{}")), { accept: brokerSide });
      assert.ok(r.ok && r.message.command === "HEARTBEAT");
    });

    it("does not widen the protocol: a name in the accept set that is no command is still unknown_command", () => {
      assert.equal(
        faultOf(decodeMessage(frames("PING", txt("{}")), { accept: new Set(["PING"]) })).code,
        "unknown_command",
      );
    });

    it("checks the command before the body: an unaccepted command with a bad body is unknown_command", () => {
      assert.equal(
        faultOf(decodeMessage(frames("STEP", txt("not json")), { accept: brokerSide })).code,
        "unknown_command",
      );
    });
  });

  describe("sniffEncoding", () => {
    const cases: [string, Uint8Array, "json" | "msgpack" | undefined][] = [
      ["{ is JSON", txt("{}"), "json"],
      ["JSON white space (space, tab, LF, CR) then { is JSON", txt(" \t\n\r{}"), "json"],
      ["fixmap 0x80 is MessagePack", hex("80"), "msgpack"],
      ["fixmap 0x8f is MessagePack", hex("8f"), "msgpack"],
      ["map16 0xde is MessagePack", hex("de0000"), "msgpack"],
      ["map32 0xdf is MessagePack", hex("df00000000"), "msgpack"],
      ["an empty body is neither", new Uint8Array(0), undefined],
      ["white space only is neither", txt("  \n"), undefined],
      ["[ (a JSON array) is neither", txt("[]"), undefined],
      ["a UTF-8 byte-order mark before { is neither", hex("efbbbf7b7d"), undefined],
      ["vertical tab (not JSON white space) before { is neither", hex("0b7b7d"), undefined],
      ["fixarray 0x90 is neither", hex("90"), undefined],
      ["array16 0xdc is neither", hex("dc0000"), undefined],
      ["nil 0xc0 is neither", hex("c0"), undefined],
      ["fixstr 0xa1 is neither", hex("a17b"), undefined],
      ["white space before a MessagePack map is neither", hex("2080"), undefined],
    ];
    for (const [name, buf, expected] of cases) {
      it(`${name}`, () => assert.equal(sniffEncoding(buf), expected));
    }

    it("reads a Uint8Array view into a larger buffer from its own offset", () => {
      const backing = Buffer.from('xx{"in_flight":4}');
      const view = new Uint8Array(backing.buffer, backing.byteOffset + 2, backing.length - 2);
      assert.equal(sniffEncoding(view), "json");
      assert.deepEqual(bodyOf(decodeMessage([SIG, txt("HEARTBEAT"), view])), { in_flight: 4 });
    });
  });

  describe("MessagePack interoperability", () => {
    it("decodes what msgpackr sends into plain objects and arrays (no Map, no records, no class instances)", () => {
      for (const { command, body } of seeds) {
        const r = decodeMessage(encodeMessage(command, body as never, "msgpack"));
        assertPlainData(bodyOf(r), command);
      }
    });

    it("sends only what a strict MessagePack reader accepts: string-keyed maps, no extensions, no binary, no records", () => {
      for (const { command, body } of seeds) {
        const packed = encodeBody(body, "msgpack");
        assert.deepStrictEqual(
          strictUnpack(packed),
          body,
          `${command}: a strict reader reads something else`,
        );
      }
    });

    it("decodes a RESULT body written byte by byte (fixmap, fixstr keys, str8, fixarray, float64)", () => {
      const attemptId = "531ac605-1676-4393-a994-cd6f249a69f9";
      const body = hex(
        [
          "81", // fixmap, 1 entry
          "a7 726573756c7473", // "results"
          "91", // fixarray, 1 item
          "84", // fixmap, 4 entries
          "aa 617474656d70745f6964", // "attempt_id"
          `d9 24 ${Buffer.from(attemptId).toString("hex")}`, // str8 of 36 bytes
          "a6 737461747573", // "status"
          "a8 636f6d706c657465", // "complete"
          "a6 6f7574707574", // "output"
          "82", // fixmap, 2 entries
          "a5 76616c6964 c3", // "valid": true
          "ab 746f74616c5f63656e7473 cd 3a8e", // "total_cents": uint16 14990
          "ab 6475726174696f6e5f6d73", // "duration_ms"
          "cb 3ff8000000000000", // float64 1.5
        ].join(" "),
      );
      const r = decodeMessage(frames("RESULT", body));
      assert.ok(r.ok && r.encoding === "msgpack");
      assert.deepStrictEqual(bodyOf(r), {
        results: [
          {
            attempt_id: attemptId,
            status: "complete",
            output: { valid: true, total_cents: 14990 },
            duration_ms: 1.5,
          },
        ],
      });
    });

    it("decodes float32 and the negative fixint, int8 and int16 forms another library may choose", () => {
      const body = hex(
        [
          "83", // fixmap, 3 entries
          "a8 7072696f72697479 ff", // "priority": -1 (negative fixint)
          "aa 726571756573745f6964 a1 72", // "request_id": "r"
          "a7 636f6e74657874 83", // "context": fixmap, 3 entries
          "a1 61 d0 80", // "a": int8 -128
          "a1 62 d1 8000", // "b": int16 -32768
          "a1 63 ca 3f000000", // "c": float32 0.5
        ].join(" "),
      );
      // The template is required by SUBMIT; without it we expect exactly that schema error,
      // which proves the map itself decoded.
      const f = faultOf(decodeMessage(frames("SUBMIT", body)));
      assert.equal(f.code, "schema_violation");
      assert.equal(f.instancePath, "");
      assert.equal(f.schemaPath, "#/required");
      const ok = decodeMessage(frames("HEARTBEAT", hex("81 a9 696e5f666c69676874 ca 40400000"))); // float32 3.0
      assert.deepStrictEqual(bodyOf(ok), { in_flight: 3 });
    });

    it("decodes every valid vector written by the independent encoder (map16, str16, array16, 64-bit ints)", () => {
      for (const { command, body } of seeds) {
        const packed = Buffer.from(handPack(body));
        assert.deepStrictEqual(strictUnpack(packed), body, "the hand encoder itself is wrong");
        const r = decodeMessage(frames(command, packed));
        assert.ok(r.ok && r.encoding === "msgpack", `${command}: ${r.ok ? "" : r.fault.message}`);
        assert.deepStrictEqual(r.message.body, body, `${command}: the body changed`);
      }
    });

    it("decodes a body the same whichever encoding carried it", () => {
      for (const { command, body } of seeds) {
        const viaJson = bodyOf(decodeMessage(encodeMessage(command, body as never, "json")));
        const viaMsgpack = bodyOf(decodeMessage(encodeMessage(command, body as never, "msgpack")));
        const viaOtherEncoder = bodyOf(decodeMessage(frames(command, Buffer.from(handPack(body)))));
        assert.deepStrictEqual(viaMsgpack, viaJson, command);
        assert.deepStrictEqual(viaOtherEncoder, viaJson, command);
      }
    });

    it("has a strict reader that does refuse msgpackr records, so the test above proves the codec sends none", () => {
      // Guards the codec's own Packr settings: records are what a default msgpackr would send.
      const recordPackr = new Packr({ useRecords: true });
      const body = { acks: [{ attempt_id: "531ac605-1676-4393-a994-cd6f249a69f9", outcome: "stored" }] };
      const packed = recordPackr.pack(body);
      assert.throws(() => strictUnpack(packed), /not allowed/);
      assert.doesNotThrow(() => strictUnpack(encodeBody(body, "msgpack")));
    });
  });

  describe("MessagePack strings must be UTF-8", () => {
    // moreTypes: a Date becomes an extension (timestamp): the walk must step over it and over bin.
    const packr = new Packr({ useRecords: false, moreTypes: true });
    const sizes = [3, 40, 300, 70_000]; // fixstr, str8, str16, str32

    it("finds no fault in valid strings of every size, beside bin, ext, arrays and maps", () => {
      for (const n of sizes) {
        const value = {
          bin: Buffer.from([0xff, 0xa1, 0xff]),
          when: new Date(0),
          list: [1, -1, 1.5, 2 ** 40, null, true, "a".repeat(n) + "é"],
          nested: { ["k".repeat(n)]: "ü".repeat(n) },
        };
        assert.equal(firstInvalidUtf8String(packr.pack(value)), -1, `strings of ${n} bytes`);
      }
    });

    it("finds the string whose bytes are not UTF-8, at every size, after bin and ext values", () => {
      for (const n of sizes) {
        const buf = packr.pack({
          bin: Buffer.from([0xc3, 0xa9]),
          when: new Date(0),
          list: [1, { s: "a".repeat(n) + "é" }],
        });
        // the last é (0xC3 0xA9) is the string's; 0xFF can start no UTF-8 sequence
        const at = buf.lastIndexOf(Buffer.from("é"));
        buf[at] = 0xff;
        assert.ok(firstInvalidUtf8String(buf) >= 0, `a bad string of ${n} bytes`);
        const decoded = decodeMessage([Buffer.from(SIGNATURE), Buffer.from("HEARTBEAT"), buf]);
        assert.equal(decoded.ok ? "ok" : decoded.fault.code, "undecodable_body");
      }
    });
  });
});

describe("JSON bodies the storable-value walk may skip", () => {
  // decodeBody walks a parsed JSON body for values jsonb cannot store only when its bytes hold a
  // \u escape or a number with an exponent or hundreds of digits: these prove that every way a
  // JSON text can carry such a value still gets its fault.
  const refused: [string, string, string][] = [
    ["an exponent past a double's range", '{"a":1e999}', "undecodable_body"],
    ["a negative one with a signed exponent", '{"a":[1,-1E+400]}', "undecodable_body"],
    ["309 digits with no exponent", `{"a":${"9".repeat(309)}}`, "undecodable_body"],
    ["U+0000 in a string", '{"a":"x\\u0000"}', "unstorable_value"],
    ["U+0000 in a key", '{"k\\u0000":1}', "unstorable_value"],
    ["a lone high surrogate", '{"a":"\\ud800"}', "unstorable_value"],
    ["a lone low surrogate in an array", '{"a":["\\uDC00"]}', "unstorable_value"],
  ];
  for (const [what, text, code] of refused)
    it(`refuses ${what}: ${code}`, () => {
      const out = decodeBody(Buffer.from(text));
      assert.equal(out.ok ? "ok" : out.fault.code, code);
    });

  it("accepts what only looks like those: escapes and exponents inside strings, paired surrogates, true and false", () => {
    const text = '{"a":"1e999 \\\\u0000","b":"\\ud83d\\ude00","c":[true,false,null,0.5,1e5,123]}';
    const out = decodeBody(Buffer.from(text));
    assert.ok(out.ok, out.ok ? "" : out.fault.message);
    assert.deepEqual(out.value, JSON.parse(text));
  });

  it("says a number may overflow only when one has an exponent or more than 300 digits in a row", () => {
    const flag = (t: string) => scanJson(Buffer.from(t), MAX_DEPTH).mayOverflow;
    assert.equal(flag('{"id":"866e-1e5","t":true,"f":false,"n":[1,2.5,-3]}'), false);
    assert.equal(flag(`{"n":${"1".repeat(300)}}`), false);
    assert.equal(flag(`{"n":${"1".repeat(301)}}`), true);
    assert.equal(flag('{"n":2e1}'), true);
    assert.equal(flag('{"n":2.0E-1}'), true);
  });

  it("judges 5,000 random JSON bodies as the walk over JSON.parse's value does (seed 0x16)", () => {
    const rnd = prng(0x16);
    const leaves = [
      "1",
      "-0.5E-3",
      "1e400",
      "-1e308",
      "9".repeat(310),
      "12345678901234567890",
      "true",
      "false",
      "null",
      '"e"',
      '"1e999"',
      '"\\u0000"',
      '"\\\\u0000"',
      '"\\ud800"',
      '"\\ud83d\\ude00"',
      '"\\udfff x"',
      '"é"',
    ];
    const keys = leaves.filter((l) => l.startsWith('"'));
    const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rnd() * xs.length)]!;
    const value = (depth: number): string => {
      const r = rnd();
      if (depth > 3 || r < 0.5) return pick(leaves);
      // a key is a string leaf with its index added, so no two keys of an object are the same
      const items = Array.from({ length: Math.floor(rnd() * 4) }, (_, i) =>
        r < 0.75 ? value(depth + 1) : `${pick(keys).slice(0, -1)} ${i}":${value(depth + 1)}`,
      );
      return r < 0.75 ? `[${items.join(",")}]` : `{${items.join(",")}}`;
    };
    const seen = new Map<string, number>();
    for (let i = 0; i < 5000; i++) {
      const text = `{"v":${value(1)}}`;
      const expected = valueProblem(JSON.parse(text), MAX_DEPTH)?.code ?? "ok";
      const out = decodeBody(Buffer.from(text));
      assert.equal(out.ok ? "ok" : out.fault.code, expected, text);
      seen.set(expected, (seen.get(expected) ?? 0) + 1);
    }
    // the bodies cover every outcome, each many times
    for (const code of ["ok", "undecodable_body", "unstorable_value"])
      assert.ok((seen.get(code) ?? 0) > 500, `${code}: ${seen.get(code)}`);
  });
});

describe("schema_violation messages", () => {
  it("name the field an additionalProperties error is about, not only its parent", () => {
    const hello = JSON.parse(
      readFileSync(
        join(dirname(fileURLToPath(import.meta.url)), "../../protocol/vectors/hello.json"),
        "utf8",
      ),
    ) as {
      valid: { body: Record<string, unknown> }[];
    };
    const body = { ...hello.valid[0]!.body, lables: { team: "x" } };
    const out = validateBody("HELLO", body);
    assert.equal(out.ok, false);
    if (out.ok) return;
    assert.equal(out.fault.code, "schema_violation");
    assert.equal(out.fault.instancePath, "");
    assert.match(out.fault.message, /must NOT have additional properties: "lables" is not a field here/);
  });
});

describe("the depth limit of the values a body carries on", () => {
  // MAX_VALUE_DEPTH levels of the value's own, the value itself being level 1.
  const nest = (levels: number): unknown => (levels <= 1 ? { leaf: true } : { n: nest(levels - 1) });
  const id = (i: number): string => `00000000-0000-4000-8000-${String(i).padStart(12, "0")}`;
  const complete = (i: number, output: unknown) => ({ attempt_id: id(i), status: "complete", output });
  const failed = (i: number, details: unknown) => ({
    attempt_id: id(i),
    status: "error",
    error: { type: "Deep", message: "details nest", retryable: false, details },
  });

  it(`accepts each carried value at ${MAX_VALUE_DEPTH} levels`, () => {
    const body = { results: [complete(0, nest(MAX_VALUE_DEPTH)), failed(1, nest(MAX_VALUE_DEPTH))] };
    const out = validateBody("RESULT", body);
    assert.ok(out.ok, out.ok ? "" : out.fault.message);
    const submit = validateBody("SUBMIT", {
      request_id: "1",
      template: { namespace: "shop", name: "order" },
      context: nest(MAX_VALUE_DEPTH),
    });
    assert.ok(submit.ok, submit.ok ? "" : submit.fault.message);
  });

  const CASES = [
    {
      title: "a later result's output",
      results: [complete(0, null), complete(1, nest(MAX_VALUE_DEPTH + 1))],
      path: "/results/1/output",
      at: 1,
    },
    {
      title: "an error's details",
      results: [failed(0, nest(MAX_VALUE_DEPTH + 1))],
      path: "/results/0/error/details",
      at: 0,
    },
    {
      title: "the first of two deep results",
      results: [
        complete(0, null),
        failed(1, nest(MAX_VALUE_DEPTH + 1)),
        complete(2, nest(MAX_VALUE_DEPTH + 1)),
      ],
      path: "/results/1/error/details",
      at: 1,
    },
  ];
  for (const c of CASES) {
    it(`refuses ${c.title} at ${MAX_VALUE_DEPTH + 1} levels with too_deep, naming its path and attempt`, () => {
      const out = validateBody("RESULT", { results: c.results });
      assert.equal(out.ok, false);
      if (out.ok) return;
      assert.equal(out.fault.code, "too_deep");
      assert.equal(out.fault.instancePath, c.path);
      assert.equal(out.fault.attemptId, id(c.at));
      assert.ok(
        out.fault.message.startsWith(`RESULT body: ${c.path} nests deeper than ${MAX_VALUE_DEPTH} levels.`),
        out.fault.message,
      );
    });
  }

  it("refuses a SUBMIT context one level too deep, with no attempt to name", () => {
    const out = validateBody("SUBMIT", {
      request_id: "1",
      template: { namespace: "shop", name: "order" },
      context: nest(MAX_VALUE_DEPTH + 1),
    });
    assert.equal(out.ok, false);
    if (out.ok) return;
    assert.equal(out.fault.code, "too_deep");
    assert.equal(out.fault.instancePath, "/context");
    assert.equal(out.fault.attemptId, undefined);
  });
});
