#!/usr/bin/env bash
# One command: install the client libraries (if missing) and run the matrix.
# usage: bash scripts/clients/run.sh [eviction_forms.py args, e.g. --window 30 --jobs 6]
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="${AIOXMPP_VENV:-/tmp/prg-proxy-clients-venv}"
if ! /usr/bin/python3 -c 'import slixmpp' 2>/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-slixmpp
fi
command -v node >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm; }
[ -d "$HERE/node_modules/@xmpp/client" ] || (cd "$HERE" && npm install --no-audit --no-fund --silent)
if ! "$VENV/bin/python" -c 'import aioxmpp' 2>/dev/null; then
  /usr/bin/python3 -m venv "$VENV"
  # aioxmpp 0.13.3 imports pytz without declaring it
  "$VENV/bin/pip" install -q aioxmpp==0.13.3 pytz
fi
export AIOXMPP_PYTHON="$VENV/bin/python"
exec /usr/bin/python3 "$HERE/eviction_forms.py" "$@"
