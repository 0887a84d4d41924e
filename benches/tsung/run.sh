#!/usr/bin/env bash
# Tsung against a Prosody node pair, once through prg-proxy and once straight
# to Prosody, with the summary of both printed at the end. Started by
# `scripts/loadbench.sh --tsung` (or alone). Installs tsung and prosody with
# apt-get when missing and INSTALL is not 0. Loopback only.
#
#   USERS (default 200), DURATION seconds of arrivals (default 20),
#   PRG_PROXY_BIN (default: release build in CARGO_TARGET_DIR or target).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
users="${USERS:-200}"
duration="${DURATION:-20}"
rate=$(awk -v u="$users" -v d="$duration" 'BEGIN { r = u / d; if (r < 1) r = 1; print r }')
proxy_bin="${PRG_PROXY_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/prg-proxy}"

need=()
command -v tsung >/dev/null 2>&1 || need+=(tsung)
command -v prosody >/dev/null 2>&1 || need+=(prosody)
if [ "${#need[@]}" -gt 0 ]; then
  if [ "${INSTALL:-1}" = 0 ] || [ "$(id -u)" != 0 ]; then
    echo "tsung/run.sh: missing ${need[*]} (and not installing): skipped" >&2
    exit 0
  fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

work="$(mktemp -d /tmp/prg-tsung.XXXXXX)"
chmod 755 "$work"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 1 100); do
    (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "tsung/run.sh: nothing listens on port $1" >&2
  return 1
}

"$proxy_bin" gen-cert --out "$work/certs" example.com localhost >/dev/null

# Two Prosody instances with the same accounts: the "pair".
ports=()
for node in imp1 imp2; do
  port=$(free_port)
  ports+=("$port")
  d="$work/$node"
  mkdir -p "$d/data/example%2ecom/accounts"
  for i in $(seq 1 "$users"); do
    printf 'return {\n\t["password"] = "pw%s";\n};\n' "$i" >"$d/data/example%2ecom/accounts/u$i.dat"
  done
  cat >"$d/prosody.cfg.lua" <<CFG
run_as_root = true
pidfile = "$d/prosody.pid"
data_path = "$d/data"
log = { { levels = { min = "error" }, to = "file", filename = "$d/prosody.log" } }
interfaces = { "127.0.0.1" }
c2s_ports = { $port }
s2s_ports = { }
http_ports = { }
https_ports = { }
modules_enabled = { "roster", "saslauth", "tls", "disco", "ping", "posix" }
modules_disabled = { "s2s" }
authentication = "internal_plain"
c2s_require_encryption = false
allow_unencrypted_plain_auth = true
ssl = { certificate = "$work/certs/dev-cert.pem", key = "$work/certs/dev-key.pem" }
VirtualHost "example.com"
CFG
  prosody -F --config "$d/prosody.cfg.lua" >"$d/stdout.log" 2>&1 &
  pids+=("$!")
  wait_port "$port"
done

proxy_port=$(free_port)
cat >"$work/proxy.toml" <<CFG
[group]
name = "tsung"
assignment = "active-standby"
domains = ["example.com"]

[[nodes]]
name = "imp1"
address = "127.0.0.1:${ports[0]}"

[[nodes]]
name = "imp2"
address = "127.0.0.1:${ports[1]}"

[admin]
enabled = false

[listen]
starttls = "127.0.0.1:$proxy_port"

[tls]
cert = "$work/certs/dev-cert.pem"
key = "$work/certs/dev-key.pem"
CFG
RUST_LOG=warn "$proxy_bin" run --config "$work/proxy.toml" >"$work/proxy.log" 2>&1 &
pids+=("$!")
wait_port "$proxy_port"
sleep 1

run_tsung() { # name port
  local name="$1" port="$2" out="$work/tsung-$1"
  mkdir -p "$out"
  sed -e "s/@PORT@/$port/" -e "s/@USERS@/$users/g" -e "s/@RATE@/$rate/" -e "s/@PHASE@/$((duration * 2))/g" \
    "$here/scenario.xml.in" >"$out/scenario.xml"
  (cd "$out" && HOME="$out" timeout $((duration * 4 + 120)) tsung -f "$out/scenario.xml" -l "$out/log" start >"$out/stdout.log" 2>&1) || true
  local log
  log=$(find "$out/log" -name tsung.log | head -1)
  echo "== $name =="
  if [ -z "$log" ]; then
    echo "no tsung.log; see $out/stdout.log"
    return
  fi
  # Sum the per-interval dumps: for timings (name count mean stddev max min
  # ...) a count-weighted mean and the overall max; for counters, the last
  # running total (the last field).
  awk '
    $1 == "stats:" && $2 ~ /^(connect|tr_login|tr_roster|tr_logout|session)$/ {
      n[$2] += $3; s[$2] += $3 * $4; if ($6 > m[$2]) m[$2] = $6; next }
    $1 == "stats:" && $2 ~ /^(users_count|finish_users_count|connected|size_rcv|size_sent|error_.*)$/ {
      t[$2] = $NF }
    END {
      for (k in n) if (n[k] > 0) printf "  %-20s count %6d  mean %8.2f ms  max %8.2f ms\n", k, n[k], s[k] / n[k], m[k]
      for (k in t) printf "  %-20s total %6d\n", k, t[k]
    }' "$log" | sort
}

echo "SUMMARY tsung: $users users arriving over ${duration}s (STARTTLS, SASL PLAIN, bind, session, presence, roster, 10 chats, logout)"
run_tsung through-prg-proxy "$proxy_port"
run_tsung straight-to-prosody "${ports[0]}"
echo "SUMMARY tsung: logs in $work"
