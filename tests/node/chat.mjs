// chat.mjs: stream one answer over wss://. Run: NODE_EXTRA_CA_CERTS=cert.pem node chat.mjs [BASE_URL]
import OpenAI from "openai";
import { OpenAIRealtimeWS } from "openai/realtime/ws";

const baseURL = process.argv[2] ?? "https://127.0.0.1:8765/v1";
const rt = new OpenAIRealtimeWS({ model: "assistant" }, new OpenAI({ apiKey: "unused", baseURL }));
rt.on("error", (err) => console.error(err.message)); // a server's coded error is in err.error.code
rt.on("session.created", (event) => {
  console.log("conversation:", event.session.conversation_id); // keep it to resume later
  rt.send({ type: "session.update",
            session: { type: "realtime", output_modalities: ["text"] } });
  rt.send({ type: "conversation.item.create", item: { type: "message", role: "user",
            content: [{ type: "input_text", text: "What is the capital of Japan?" }] } });
  rt.send({ type: "response.create" });
});
rt.on("response.output_text.delta", (event) => process.stdout.write(event.delta));
rt.on("response.done", (event) => {
  console.log("\n", event.response.usage);
  rt.close();
});
