// The official `openai` npm package's Realtime client (OpenAIRealtimeWS, on the `ws` package)
// against the assistant server: a text turn, then optionally an image turn. Prints one JSON
// summary on stdout for tests/test_client_node.py; exits 1 when the connection failed, 2 on a timeout.
//
//   node realtime_turns.mjs BASE_URL [--plain] [--image FILE.png]
//
// BASE_URL is what an `OpenAI` client takes, e.g. https://127.0.0.1:8765/v1. The SDK always
// connects to wss://; with a self-signed certificate run node with NODE_EXTRA_CA_CERTS=cert.pem.
// --plain reaches a server without TLS (ws://): see connect().
import fs from "node:fs";
import net from "node:net";
import { parseArgs } from "node:util";
import OpenAI from "openai";
import { OpenAIRealtimeWS } from "openai/realtime/ws";

const TIMEOUT_MS = 60_000;

function connect(baseURL, plain) {
  const client = new OpenAI({ apiKey: "unused", baseURL });
  if (!plain) {
    return new OpenAIRealtimeWS({ model: "assistant" }, client);
  }
  // The SDK turns any baseURL into wss://HOST:PORT/v1/realtime; `ws` lets us hand it the
  // connection, and a plain TCP one (instead of TLS) makes that URL speak ws://.
  return new OpenAIRealtimeWS(
    { model: "assistant", options: { createConnection: ({ host, port }) => net.connect(port, host) } },
    client,
  );
}

// Every server event in order, and promises for the next event of a type.
class EventLog {
  constructor(rt) {
    this.events = [];
    this.waiters = [];
    rt.on("event", (event) => {
      this.events.push(event);
      this.waiters = this.waiters.filter(({ type, resolve }) => (event.type === type ? (resolve(event), false) : true));
    });
  }

  next(type) {
    return new Promise((resolve) => this.waiters.push({ type, resolve }));
  }
}

async function turn(rt, log, content) {
  const start = log.events.length;
  const done = log.next("response.done");
  rt.send({ type: "conversation.item.create", item: { type: "message", role: "user", content } });
  rt.send({ type: "response.create" });
  const { response } = await done;
  const events = log.events.slice(start);
  return {
    events: events.map((event) => event.type),
    text: events.filter((e) => e.type === "response.output_text.delta").map((e) => e.delta).join(""),
    num_deltas: events.filter((e) => e.type === "response.output_text.delta").length,
    text_done: events.find((e) => e.type === "response.output_text.done")?.text ?? null,
    errors: events.filter((e) => e.type === "error").map((e) => e.error),
    response: { status: response.status, usage: response.usage, output_text: response.output[0]?.content?.[0]?.text },
  };
}

async function main(summary) {
  const { positionals, values } = parseArgs({
    allowPositionals: true,
    options: { plain: { type: "boolean", default: false }, image: { type: "string" } },
  });
  const rt = connect(positionals[0], values.plain);
  summary.url = rt.url.toString();
  const log = new EventLog(rt);
  rt.on("event", (event) => summary.events_seen.push(event.type));
  // Coded server errors arrive as `error` events in the log too; without this listener the
  // SDK turns each into an unhandled rejection.
  rt.on("error", (err) => {
    if (!err.error) summary.transport_errors.push(err.message);
  });
  const closed = new Promise((resolve) => rt.socket.on("close", (code) => resolve(code)));
  const created = await Promise.race([log.next("session.created"), closed]);
  if (typeof created === "number") {
    summary.close_code = created;
    return;
  }
  summary.session = created.session;

  const updated = log.next("session.updated");
  rt.send({ type: "session.update", session: { type: "realtime", output_modalities: ["text"], max_output_tokens: 8,
                                            temperature: 0 } });  // greedy: the same answer every run (sampled, the tiny random model sometimes ends at once)
  summary.session = (await updated).session;

  summary.turns.text = await turn(rt, log, [{ type: "input_text", text: "Say hello from Node." }]);
  if (values.image) {
    const png = fs.readFileSync(values.image).toString("base64");
    summary.turns.image = await turn(rt, log, [
      { type: "input_text", text: "What is in this picture?" },
      { type: "input_image", image_url: `data:image/png;base64,${png}`, detail: "high" },
    ]);
  }
  rt.close();
  summary.close_code = await closed;
}

const summary = { url: null, session: null, turns: {}, events_seen: [], transport_errors: [] };
const timer = setTimeout(() => {
  console.log(JSON.stringify({ ...summary, timed_out: true }));
  process.exit(2);
}, TIMEOUT_MS);
await main(summary);
clearTimeout(timer);
console.log(JSON.stringify(summary));
process.exitCode = summary.session ? 0 : 1;
