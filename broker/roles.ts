/**
 * Roles: what a peer may send depends on the socket it is connected to (with
 * CURVE, the allow-list its key is on). See PROTOCOL.md "Roles and sockets".
 *
 *   pool    HELLO, RESULT, PROGRESS, HEARTBEAT, DISCONNECT: serves steps
 *   client  SUBMIT, STATUS, WAIT, CANCEL_TASK, POOLS (without pool ids), HISTORY
 *   admin   every client command; POOLS shows pool ids
 *
 * ERROR is accepted from every role: it only reports, and never earns a reply.
 */
import { ClientCommands, PoolCommands } from "../protocol";

export const Roles = { POOL: "pool", CLIENT: "client", ADMIN: "admin" } as const;
export type Role = (typeof Roles)[keyof typeof Roles];

const POOL_ONLY = new Set<string>([
  PoolCommands.HELLO,
  PoolCommands.RESULT,
  PoolCommands.PROGRESS,
  PoolCommands.HEARTBEAT,
  PoolCommands.DISCONNECT,
]);
const CLIENT = new Set<string>(Object.values(ClientCommands));

/** Whether a peer holding `roles` may send `command`. */
export function roleAllows(roles: ReadonlySet<Role>, command: string): boolean {
  if (command === PoolCommands.ERROR) return true;
  if (POOL_ONLY.has(command)) return roles.has(Roles.POOL);
  if (CLIENT.has(command)) return roles.has(Roles.CLIENT) || roles.has(Roles.ADMIN);
  return false;
}

/** The roles that may send `command`, for the forbidden error's message. */
export function rolesFor(command: string): Role[] {
  if (command === PoolCommands.ERROR) return [Roles.POOL, Roles.CLIENT, Roles.ADMIN];
  if (POOL_ONLY.has(command)) return [Roles.POOL];
  if (CLIENT.has(command)) return [Roles.CLIENT, Roles.ADMIN];
  return [];
}
