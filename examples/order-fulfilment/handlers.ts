/**
 * Handlers for the demo workflow. Each receives its parents' outputs in
 * `step.inputs`, keyed by step name, and returns its own output.
 */
import type { HandlerPool } from "../../handlers-node";

interface OrderContext {
  order_id: string;
  customer: string;
  items: { sku: string; quantity: number; unit_price: number }[];
}

function pause(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    const t = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(t);
      reject(signal.reason);
    });
  });
}

export function registerOrderHandlers(pool: HandlerPool, delayMs = 300): void {
  pool.handle("validate_order", async (step, ctx) => {
    const order = step.context as unknown as OrderContext;
    await pause(delayMs, ctx.signal);
    if (!order.items?.length) throw new Error("an order needs at least one item");
    const total = order.items.reduce((sum, i) => sum + i.quantity * i.unit_price, 0);
    return { order_id: order.order_id, total: Math.round(total * 100) / 100, item_count: order.items.length };
  });

  pool.handle("reserve_inventory", async (step, ctx) => {
    const validated = step.inputs.validate_order as { order_id: string; item_count: number };
    await ctx.progress(0.5, "checking stock");
    await pause(delayMs, ctx.signal);
    return {
      reservation_id: `res-${validated.order_id}`,
      warehouse: step.config.warehouse,
      items: validated.item_count,
    };
  });

  pool.handle("process_payment", async (step, ctx) => {
    const validated = step.inputs.validate_order as { order_id: string; total: number };
    await pause(delayMs * 1.5, ctx.signal);
    return {
      payment_id: `pay-${validated.order_id}`,
      charged: validated.total,
      currency: step.config.currency,
    };
  });

  pool.handle("ship_order", async (step, ctx) => {
    const reservation = step.inputs.reserve_inventory as { reservation_id: string; warehouse: string };
    const payment = step.inputs.process_payment as { payment_id: string };
    await pause(delayMs, ctx.signal);
    return {
      tracking_number: `TRK-${reservation.reservation_id.slice(4)}`,
      from: reservation.warehouse,
      paid_by: payment.payment_id,
    };
  });
}

export const DEMO_ORDER: OrderContext = {
  order_id: "A-1001",
  customer: "ada@example.com",
  items: [
    { sku: "KEYBOARD-60", quantity: 1, unit_price: 89.5 },
    { sku: "USB-C-CABLE", quantity: 2, unit_price: 9.75 },
  ],
};
