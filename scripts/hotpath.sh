#!/usr/bin/env bash
# Every hot-path bench in one run, one table of SUMMARY lines at the end:
# the framer against a bare and a validating quick-xml loop, the tracker
# against DashMap / RwLock<HashMap> / papaya (ops/s, latency, bytes per
# session), the relay's CPU per stanza against HAProxy terminating TLS (and
# the pass-through and plain-TCP rows), logins, and RSS per idle TLS
# connection. Method and figures: benches/README.md.
#
#   scripts/hotpath.sh               full run (release builds; ~10 minutes)
#   scripts/hotpath.sh --no-install  never apt-get install anything (HAProxy)
#
# The ratios are only worth a quiet machine: every baseline runs in the same
# run as the proxy, but other load moves both unevenly.
set -euo pipefail
cd "$(dirname "$0")/.."

load_args=()
for a in "$@"; do
  case "$a" in
    --no-install) load_args+=(--no-install) ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: $0 [--no-install]" >&2; exit 64 ;;
  esac
done

out=$(mktemp -t prg-hotpath.XXXXXX)
trap 'rm -f "$out"' EXIT

echo "== framer (cargo bench --bench framer)" >&2
cargo bench --bench framer 2>&1 | tee -a "$out" >&2
echo "== tracker (cargo bench --bench tracker)" >&2
cargo bench --bench tracker 2>&1 | tee -a "$out" >&2
echo "== relay, logins, memory (scripts/loadbench.sh)" >&2
bash scripts/loadbench.sh "${load_args[@]}" 2>&1 | tee -a "$out" >&2

echo
echo "hot path, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
grep '^SUMMARY' "$out" | sed 's/^SUMMARY //'
