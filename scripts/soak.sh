#!/usr/bin/env bash
# Soak test of prg-proxy: idle TLS connections plus steady chat and login
# churn through the proxy for a while; reports the proxy's RSS, open
# descriptors and the chatters' round-trip p50/p99 at the start and at the
# end, and fails when RSS or descriptors grew beyond the bounds.
# Method: benches/README.md ("Soak").
#
#   scripts/soak.sh                      60 s, 9,000 idle connections (CI)
#   scripts/soak.sh --duration 3600      an hour
#   scripts/soak.sh --idle 500 --duration 10    a small run
#
# Options: --duration SECS, --idle N, --chatters N, --rate MSGS_PER_S (per
# chatter), --churn LOGINS_PER_S, --max-rss-growth-pct P, --max-fd-growth N.
# LOADBENCH_BIN / PRG_PROXY_BIN point at prebuilt binaries (then nothing is
# built). Everything listens on 127.0.0.1 only. Exit status 1 on FAIL.
set -euo pipefail
cd "$(dirname "$0")/.."

duration=60 idle=9000 chatters=50 rate=5 churn=5 rss_pct=5 fd_growth=32
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) duration=$2; shift 2 ;;
    --idle) idle=$2; shift 2 ;;
    --chatters) chatters=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --churn) churn=$2; shift 2 ;;
    --max-rss-growth-pct) rss_pct=$2; shift 2 ;;
    --max-fd-growth) fd_growth=$2; shift 2 ;;
    *) echo "usage: $0 [--duration SECS] [--idle N] [--chatters N] [--rate R] [--churn R] [--max-rss-growth-pct P] [--max-fd-growth N]" >&2; exit 64 ;;
  esac
done

# shellcheck source=scripts/bench-env.sh
. scripts/bench-env.sh

need=$((2 * (idle + chatters) + 1000))
if [ "$nofile" != unlimited ] && [ "$need" -gt "$nofile" ]; then
  idle=$(((nofile - 1000) / 2 - chatters))
  echo "soak.sh: open-file limit $nofile: $idle idle connections" >&2
fi

echo "soak.sh: ${duration}s, $idle idle, $chatters chatters at ${rate}/s, churn ${churn}/s, open files $nofile"
"${driver[@]}" "$LOADBENCH_BIN" soak --proxy-bin "$PRG_PROXY_BIN" --relay-cpu "$relay_cpu" \
  --idle "$idle" --clients "$chatters" --rate "$rate" --churn "$churn" --duration "$duration" \
  --max-rss-growth-pct "$rss_pct" --max-fd-growth "$fd_growth"
