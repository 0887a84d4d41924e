"""aioxmpp 0.13.3 probe client for eviction_forms.py (run with the venv python).

usage: aioxmpp_client.py HOST PORT
aioxmpp.Client keeps the stream up by itself (its documented behaviour:
reconnect with exponential back-off), so the app only calls start().
TLS certificate checks are off (no_verify=True); PLAIN needs TLS in aioxmpp.
Every call of the password provider is printed as 'EV password_asked N':
that is where a real app would ask the user.
"""
import asyncio
import os
import sys

import aioxmpp
import aioxmpp.connector

HOST, PORT = sys.argv[1], int(sys.argv[2])


def out(name, detail=""):
    print(f"EV {name} {detail}".rstrip(), flush=True)


async def password(jid, nattempt):
    out("password_asked", str(nattempt))
    return "pw"


async def main():
    client = aioxmpp.PresenceManagedClient(
        aioxmpp.JID.fromstr(f"alice@{os.environ.get('PROBE_DOMAIN', 'example.com')}/probe"),
        aioxmpp.make_security_layer(password, no_verify=True),
        override_peer=[(HOST, PORT, aioxmpp.connector.STARTTLSConnector())],
    )
    client.on_stream_established.connect(lambda: out("session_start"))
    client.on_stream_destroyed.connect(lambda *a: out("stream_destroyed", repr(a)[:100]))
    client.on_stream_suspended.connect(lambda *a: out("stream_suspended", repr(a)[:100]))
    client.on_failure.connect(lambda err: out("failure", repr(err)[:150]))
    client.on_stopped.connect(lambda: out("stopped"))
    client.presence = aioxmpp.PresenceState(True)
    await asyncio.Event().wait()


asyncio.run(main())
