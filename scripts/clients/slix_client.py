#!/usr/bin/python3
"""slixmpp probe client for eviction_forms.py (run with Debian's /usr/bin/python3).

usage: slix_client.py HOST PORT CA_FILE MODE
  MODE plain     : a minimal app; connect() once, never again (what slixmpp
                   examples do; slixmpp itself only re-connects for
                   see-other-host)
  MODE reconnect : the usual app-level pattern: on 'disconnected' call
                   connect() again (slixmpp's own back-off applies)
Prints one 'EV name detail' line per event on stdout.
"""
import asyncio
import os
import sys

import slixmpp

HOST, PORT, CA, MODE = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]


def out(name, detail=""):
    print(f"EV {name} {detail}".rstrip(), flush=True)


class Probe(slixmpp.ClientXMPP):
    def __init__(self):
        super().__init__(f"alice@{os.environ.get('PROBE_DOMAIN', 'example.com')}/probe", "pw")
        self.ca_certs = CA
        self.add_event_handler("session_start", self.on_start)
        for ev in ("connected", "disconnected", "auth_success", "failed_auth",
                   "failed_all_auth", "no_auth", "stream_error",
                   "connection_failed", "session_end", "reconnect_delay"):
            self.add_event_handler(ev, self._logger(ev))
        if MODE == "reconnect":
            self.add_event_handler("disconnected", self.on_disconnected)

    def _logger(self, name):
        def handler(data=None):
            detail = ""
            if name == "stream_error":
                detail = data["condition"]
            elif name == "failed_auth":
                detail = data["condition"]
            elif data is not None:
                detail = str(data)[:80].replace("\n", " ")
            out(name, detail)
        return handler

    async def on_start(self, _event):
        out("session_start", str(self.boundjid))
        self.send_presence()

    def on_disconnected(self, _reason):
        out("app_reconnect", "calling connect()")
        self.connect(address=(HOST, PORT))


xmpp = Probe()
xmpp.connect(address=(HOST, PORT))
asyncio.get_event_loop().run_forever()
