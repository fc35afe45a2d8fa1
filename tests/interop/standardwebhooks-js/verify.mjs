// Reads {"secret", "headers", "body"} objects, one JSON document per line on stdin, and verifies each webhook
// with the JavaScript Standard Webhooks library. Prints one line per input: {"ok": true, "payload": ...} or
// {"ok": false, "error": "..."}. Exits 0 when every webhook verified, 1 otherwise.
import { createInterface } from "node:readline";
import { Webhook } from "standardwebhooks";

let failed = false;
const lines = createInterface({ input: process.stdin, crlfDelay: Infinity });
for await (const line of lines) {
  if (!line.trim()) continue;
  const { secret, headers, body } = JSON.parse(line);
  try {
    const payload = new Webhook(secret).verify(body, headers);
    process.stdout.write(JSON.stringify({ ok: true, payload }) + "\n");
  } catch (error) {
    failed = true;
    process.stdout.write(JSON.stringify({ ok: false, error: String(error && error.message) }) + "\n");
  }
}
process.exit(failed ? 1 : 0);
