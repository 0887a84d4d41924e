// @xmpp/client probe for eviction_forms.py. usage: node xmppjs_client.mjs HOST PORT
// Needs NODE_EXTRA_CA_CERTS=<dev CA> (the harness sets it). Default options:
// the bundled reconnect module is on (delay 1000 ms), as in every @xmpp/client app.
// Prints one 'EV name detail' line per event on stdout.
import { client, xml } from "@xmpp/client";

const [host, port] = process.argv.slice(2);
const out = (name, detail = "") =>
  process.stdout.write(`EV ${name} ${detail}`.trimEnd() + "\n");

const xmpp = client({
  service: `xmpp://${host}:${port}`,
  domain: process.env.PROBE_DOMAIN || "example.com",
  username: "alice",
  password: "pw",
  resource: "probe",
});

xmpp.on("status", (s) => out("status", s));
xmpp.on("error", (e) => out("error", `${e.name || ""}:${e.condition || ""}:${e.message || ""}`));
xmpp.on("online", (jid) => {
  out("session_start", jid.toString());
  xmpp.send(xml("presence")).catch(() => {});
});
xmpp.reconnect.on("reconnecting", () => out("reconnecting"));
xmpp.reconnect.on("reconnected", () => out("reconnected"));

xmpp.start().catch((e) => out("start_rejected", `${e.name || ""}:${e.condition || ""}:${e.message || ""}`));
