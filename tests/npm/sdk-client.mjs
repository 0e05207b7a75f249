// Drives a Tollgate gateway with the official TypeScript SDK client, as an agent would.
// Usage: node sdk-client.mjs <gateway /mcp URL>. Prints one JSON summary line; exits non-zero on failure.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { LoggingMessageNotificationSchema } from "@modelcontextprotocol/sdk/types.js";

const url = new URL(process.argv[2]);
const client = new Client({ name: "tollgate-e2e-ts", version: "1.0.0" });
const transport = new StreamableHTTPClientTransport(url);
await client.connect(transport);

const out = {};
out.server = client.getServerVersion()?.name;
out.sessionId = transport.sessionId;
out.protocolVersion = transport.protocolVersion;
out.tools = (await client.listTools()).tools.map((t) => t.name).sort();
out.echo = (await client.callTool({ name: "echo", arguments: { message: "hi from ts" } })).content[0].text;
out.sum = (await client.callTool({ name: "get-sum", arguments: { a: 2, b: 40 } })).content[0].text;

let progress = 0;
const long = await client.callTool(
  { name: "trigger-long-running-operation", arguments: { duration: 1, steps: 4 } },
  undefined,
  { onprogress: () => { progress += 1; }, resetTimeoutOnProgress: true },
);
out.progress = progress;
out.long = long.content[0].text;

const resources = (await client.listResources()).resources;
out.resourceCount = resources.length;
const first = await client.readResource({ uri: resources[0].uri });
out.readUri = first.contents[0].uri;
out.readOk = first.contents[0].uri === resources[0].uri;
const prompts = (await client.listPrompts()).prompts.map((p) => p.name);
out.prompts = prompts;
const simple = await client.getPrompt({ name: prompts.find((p) => p.includes("simple")) ?? prompts[0], arguments: {} });
out.promptMessages = simple.messages.length;

const logs = [];
client.setNotificationHandler(LoggingMessageNotificationSchema, (n) => logs.push(n.params.level));
await client.setLoggingLevel("debug");
out.loggingSet = true;

// Cancellation: abort a long call; the SDK sends notifications/cancelled, the gateway ends it.
const ac = new AbortController();
const started = Date.now();
const cancelled = client
  .callTool({ name: "trigger-long-running-operation", arguments: { duration: 20, steps: 20 } }, undefined, { signal: ac.signal })
  .then(() => "completed", (e) => "aborted");
setTimeout(() => ac.abort("test"), 300);
out.cancelled = await cancelled;
out.cancelMs = Date.now() - started;
out.afterCancel = (await client.callTool({ name: "echo", arguments: { message: "after" } })).content[0].text;

await transport.terminateSession();
await client.close();
console.log(JSON.stringify(out));
