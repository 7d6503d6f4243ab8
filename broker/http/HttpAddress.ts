/**
 * Where the HTTP server listens, and whether that is reachable only from this
 * machine: the same rule as the ZeroMQ endpoints (a non-loopback address needs
 * authentication, or an explicit --insecure).
 */
import { isIP } from "node:net";

export interface HttpAddress {
  host: string;
  /** 0 lets the system choose a free port (tests). */
  port: number;
}

/** Parses "host:port", "[v6]:port" or a bare port (on 127.0.0.1). */
export function parseHttpAddress(text: string): HttpAddress {
  const t = text.trim();
  const bare = /^\d+$/.exec(t);
  const m = bare ? null : /^(?:\[([^\]]+)\]|([^:[\]]+)):(\d+)$/.exec(t);
  const host = bare ? "127.0.0.1" : (m?.[1] ?? m?.[2]);
  const portText = bare ? t : m?.[3];
  const port = Number(portText);
  if (host === undefined || !Number.isInteger(port) || port < 0 || port > 65535)
    throw new Error(
      `HTTP address ${JSON.stringify(text)} is not host:port (e.g. 127.0.0.1:8080, [::1]:8080, 0.0.0.0:8080)`,
    );
  return { host, port };
}

/** True when only processes on this machine can reach `host`. */
export function isLoopbackHost(host: string): boolean {
  const h = host.toLowerCase();
  if (h === "localhost" || h === "::1") return true;
  if (isIP(h) === 4) return h.startsWith("127.");
  return h === "::ffff:127.0.0.1";
}

/** "host:port" as a URL's authority (IPv6 in brackets). */
export function formatHostPort(host: string, port: number): string {
  return `${isIP(host) === 6 ? `[${host}]` : host}:${port}`;
}
