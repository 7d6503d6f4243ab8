import js from "@eslint/js";
import tseslint from "typescript-eslint";

export default tseslint.config(
  {
    ignores: [
      "node_modules/",
      ".stepbroker/",
      "handlers-python/",
      "handlers-ruby/",
      "protocol/types.generated.ts",
    ],
  },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    languageOptions: {
      globals: {
        process: "readonly",
        console: "readonly",
        setTimeout: "readonly",
        clearTimeout: "readonly",
        setInterval: "readonly",
        clearInterval: "readonly",
        Buffer: "readonly",
      },
    },
    rules: {
      "@typescript-eslint/no-unused-vars": ["error", { argsIgnorePattern: "^_", varsIgnorePattern: "^_" }],
    },
  },
  // The one-way dependency rule (DESIGN.md, "Parts and the direction of dependencies"):
  // protocol/ is the contract and imports neither side; the broker and the Node SDK meet only there.
  ...[
    ["broker/**/*.ts", ["handlers-node"], "the broker and the Node SDK share only protocol/"],
    [
      "handlers-node/**/*.ts",
      ["broker"],
      "a remote handler host installs the SDK without the broker; share code through protocol/",
    ],
    [
      "protocol/**/*.ts",
      ["broker", "handlers-node"],
      "protocol/ is the contract: it knows neither the broker nor an SDK",
    ],
  ].map(([files, forbidden, why]) => ({
    files: [files],
    rules: {
      "no-restricted-imports": [
        "error",
        {
          patterns: [{ group: forbidden.flatMap((dir) => [`**/${dir}`, `**/${dir}/**`]), message: why }],
        },
      ],
    },
  })),
  {
    // The dashboard runs in the browser as plain ES modules (no build step).
    files: ["dashboard/**/*.js"],
    languageOptions: {
      globals: {
        document: "readonly",
        window: "readonly",
        location: "readonly",
        history: "readonly",
        sessionStorage: "readonly",
        fetch: "readonly",
        Node: "readonly",
        URLSearchParams: "readonly",
        FormData: "readonly",
        TextDecoderStream: "readonly",
        CSS: "readonly",
      },
    },
  },
  {
    // The mocha reporter is CommonJS: mocha loads reporters with require().
    files: ["**/*.cjs"],
    languageOptions: { sourceType: "commonjs", globals: { require: "readonly", module: "writable" } },
    rules: { "@typescript-eslint/no-require-imports": "off" },
  },
);
