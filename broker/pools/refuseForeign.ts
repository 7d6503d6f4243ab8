/**
 * Nothing one pool sends may change another's steps. When a pool names
 * attempts that were sent to another pool (in HELLO.running, RESULT, PROGRESS
 * or DISCONNECT.handed_back), each is refused by name with both pool ids in
 * the log line. At most MAX_NAMED_REFUSALS are named one by one per message;
 * one more line counts the rest.
 */
import { BrokerCommands, fault, faultToErrorBody, type CommandName } from "../../protocol";
import type { BrokerContext } from "../BrokerContext";
import type { InFlight, PoolRecord } from "./PoolRegistry";

export const MAX_NAMED_REFUSALS = 16;

export interface ForeignAttempt {
  attemptId: string;
  /** The pool it was sent to. */
  owner: string;
  flight?: InFlight | undefined;
}

export function refuseForeign(
  ctx: BrokerContext,
  pool: PoolRecord,
  command: CommandName,
  attempts: ForeignAttempt[],
): void {
  if (attempts.length === 0) return;
  for (let i = 0; i < attempts.length; i++) ctx.metrics.protocolFault("not_your_attempt");
  for (const { attemptId, owner, flight } of attempts.slice(0, MAX_NAMED_REFUSALS)) {
    ctx.log.warn(
      {
        pool_id: pool.poolId,
        owner_pool_id: owner,
        attempt_id: attemptId,
        task_id: flight?.taskId,
        step_id: flight?.stepId,
        command,
      },
      `refused ${command} from pool ${pool.poolId} for attempt ${attemptId}: it was sent to pool ${owner}`,
    );
    ctx.send(
      pool.identity,
      BrokerCommands.ERROR,
      faultToErrorBody(
        fault("not_your_attempt", `attempt ${attemptId} was sent to another pool`, { command }),
        {
          attempt_id: attemptId,
        },
      ),
      pool.encoding,
    );
  }
  if (attempts.length > MAX_NAMED_REFUSALS) {
    ctx.log.warn(
      { pool_id: pool.poolId, command, refused: attempts.length },
      `refused ${command} from pool ${pool.poolId} for ${attempts.length - MAX_NAMED_REFUSALS} more attempts sent to other pools`,
    );
  }
}
