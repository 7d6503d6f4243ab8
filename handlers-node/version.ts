import type { Sdk } from "../protocol";

/** Sent in HELLO as `sdk`; kept in step with the stepbroker package version. */
export const SDK_VERSION = "0.1.0";
export const SDK: Sdk = { language: "node", name: "stepbroker-handlers-node", version: SDK_VERSION };
