#!/usr/bin/env bash
# End-to-end load bench of prg-proxy: relay throughput against the node
# directly, a plain tokio relay and HAProxy; logins per second; RSS per idle
# TLS connection; optionally the Tsung scenario against a Prosody pair.
# Method and figures: benches/README.md.
#
#   scripts/loadbench.sh            full run (release build, ~1-2 minutes)
#   scripts/loadbench.sh --quick    seconds; what tests/loadbench_smoke.rs runs
#   scripts/loadbench.sh --tsung    also run benches/tsung/run.sh
#   scripts/loadbench.sh --no-install   never apt-get install anything
#
# LOADBENCH_BIN / PRG_PROXY_BIN point at prebuilt binaries (then nothing is
# built). Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0 tsung=0 install=1
for a in "$@"; do
  case "$a" in
    --quick) quick=1 ;;
    --tsung) tsung=1 ;;
    --no-install) install=0 ;;
    *) echo "usage: $0 [--quick] [--tsung] [--no-install]" >&2; exit 64 ;;
  esac
done

# shellcheck source=scripts/bench-env.sh
. scripts/bench-env.sh

# HAProxy is a baseline: install it for a full run when missing.
if ! command -v haproxy >/dev/null 2>&1 && [ "$install" = 1 ] && [ "$quick" = 0 ] && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy) \
    || echo "loadbench.sh: could not install haproxy; its comparison is skipped" >&2
fi

if [ "$quick" = 1 ]; then
  args=(--clients 4 --secs 0.5 --sizes 250 --idle 50 --login-workers 2)
else
  idle=10000
  if [ "$nofile" != unlimited ] && [ $((2 * idle + 1000)) -gt "$nofile" ]; then
    idle=$(((nofile - 1000) / 2))
    echo "loadbench.sh: open-file limit $nofile: memory test with $idle connections" >&2
  fi
  args=(--clients 50 --secs 3 --sizes 250,1024 --idle "$idle" --login-workers 16)
fi

echo "loadbench.sh: relay cpu $relay_cpu, driver ${driver[*]:-unpinned}, open files $nofile"
"${driver[@]}" "$LOADBENCH_BIN" all --proxy-bin "$PRG_PROXY_BIN" --relay-cpu "$relay_cpu" "${args[@]}"

if [ "$tsung" = 1 ]; then
  PRG_PROXY_BIN="$PRG_PROXY_BIN" INSTALL="$install" bash benches/tsung/run.sh
fi
