/**
 * A ZAP handler (ZeroMQ RFC 27) that admits CURVE clients whose public key is
 * on an allow-list. Without a ZAP handler, CURVE encrypts but admits any
 * client that knows the broker's public key.
 *
 * libzmq asks the socket bound at inproc://zeromq.zap.01 in the same context;
 * the request carries the client's raw 32-byte key, which is Z85-encoded here
 * to compare with keys written as curveKeyPair() prints them.
 */
import type { Logger } from "pino";
import { Router } from "zeromq";

export interface ZapHandler {
  close(): Promise<void>;
}

const Z85 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#";

export function z85Encode(data: Uint8Array): string {
  if (data.length % 4 !== 0) throw new Error("Z85 input length must be a multiple of 4");
  let out = "";
  for (let i = 0; i < data.length; i += 4) {
    let value = ((data[i]! << 24) >>> 0) + (data[i + 1]! << 16) + (data[i + 2]! << 8) + data[i + 3]!;
    const chunk: string[] = [];
    for (let j = 0; j < 5; j++) {
      chunk.unshift(Z85[value % 85]!);
      value = Math.floor(value / 85);
    }
    out += chunk.join("");
  }
  return out;
}

export async function startZapHandler(allowedKeys: string[], log: Logger): Promise<ZapHandler> {
  const allowed = new Set(allowedKeys);
  // A ROUTER, not a REP: one reader loop answers each request by its envelope.
  const sock = new Router({ linger: 0 });
  await sock.bind("inproc://zeromq.zap.01");
  let open = true;
  const loop = (async () => {
    try {
      for await (const frames of sock) {
        // [routing id, empty delimiter, version, request id, domain, address, identity, mechanism, ...credentials]
        const [rid, delim, version, requestId, , address, , mechanism, key] = frames;
        if (!rid || !delim || !version || !requestId) continue;
        const mech = mechanism?.toString() ?? "";
        let status = "400";
        let text = "unknown key";
        let user = "";
        if (mech === "CURVE" && key && key.length === 32) {
          const z = z85Encode(key);
          if (allowed.size === 0 || allowed.has(z)) {
            status = "200";
            text = "OK";
            user = z;
          }
          if (status !== "200")
            log.warn(
              { client_key: z, address: address?.toString() },
              "refused a CURVE client whose key is not on the allow-list",
            );
        } else {
          text = `mechanism ${mech} not allowed`;
        }
        await sock.send([rid, delim, version, requestId, status, text, user, ""]);
      }
    } catch (e) {
      if (open) log.error({ err: e }, "ZAP handler stopped");
    }
  })();
  return {
    async close() {
      open = false;
      sock.close();
      await loop;
    },
  };
}
