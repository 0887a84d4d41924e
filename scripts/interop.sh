#!/usr/bin/env bash
# Interop suite: real XMPP clients (slixmpp) through prg-proxy in front of two
# real XMPP servers (Prosody) on loopback.
#
#   bash scripts/interop.sh            # full run: Prosody x2 + prg-proxy + clients
#   bash scripts/interop.sh --direct   # baseline: the same client checks straight
#                                      # against Prosody node 1 (plain TCP, no proxy)
#
# Runs as root on a Debian machine (CI). Installs prosody and python3-slixmpp when
# missing. Every port is picked at run time; everything listens on 127.0.0.1 only.
# Prints one PASS/FAIL line per check and a final "<N> passed, <M> failed" line;
# exits 0 only if every check passed.
#
# Environment:
#   CARGO_TARGET_DIR      where cargo builds (default: <repo>/target)
#   PRG_PROXY_BIN         use this prg-proxy binary instead of building one
#   INTEROP_KEEP_TMP=1    keep the temporary directory (configs, logs, data)
#   INTEROP_TIMEOUT       per-check timeout in seconds (default 20)
#   RUST_LOG              the proxy's log filter (default info)
set -euo pipefail

MODE=proxy
for arg in "$@"; do
    case "$arg" in
        --direct) MODE=direct ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "interop: unknown argument: $arg (use --direct or nothing)" >&2
            exit 2
            ;;
    esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HERE="$REPO/scripts/interop"
CHECK_TIMEOUT="${INTEROP_TIMEOUT:-20}"
PY=/usr/bin/python3

log() { echo "interop: $*" >&2; }
die() {
    log "ERROR: $*"
    SETUP_ERROR="$*"
    exit 1
}

# ---------------------------------------------------------------- dependencies

# Another apt/dpkg run (e.g. a background install) holds the locks: wait.
wait_for_apt_lock() {
    local i
    command -v fuser >/dev/null 2>&1 || return 0 # apt-get waits itself (Lock::Timeout)
    for i in $(seq 1 300); do
        if ! fuser /var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock \
            /var/cache/apt/archives/lock >/dev/null 2>&1; then
            return 0
        fi
        [ "$i" = 1 ] && log "apt/dpkg is busy (another install running); waiting for its lock"
        sleep 2
    done
    die "apt/dpkg lock still held after 10 minutes"
}

apt_get() {
    wait_for_apt_lock
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 "$@"
}

# apt_install PKG...: install; on failure refresh the package lists and retry.
apt_install() {
    local i
    apt_get install -y "$@" && return 0
    apt_get update || true
    for i in 1 2 3; do
        apt_get install -y "$@" && return 0
        sleep 5
    done
    die "apt-get install $* failed"
}

pkg_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

ensure_deps() {
    local missing=()
    [ -x "$PY" ] || missing+=(python3)
    pkg_installed prosody || missing+=(prosody)
    pkg_installed python3-slixmpp || missing+=(python3-slixmpp)
    if [ "${#missing[@]}" -gt 0 ]; then
        log "installing: ${missing[*]}"
        apt_install "${missing[@]}"
    fi
    # The Debian package's Prosody service may have been started by the install:
    # it would hold 5222/5269. It is not ours and not needed; leave it alone, our
    # nodes use their own ports.
    if ! "$PY" -c 'import slixmpp' >/dev/null 2>&1; then
        # Debian's slixmpp does not import here: install it with pip, for
        # /usr/bin/python3 if possible, else for the python3 on PATH.
        log "$PY cannot import slixmpp; trying pip"
        "$PY" -m pip --version >/dev/null 2>&1 || apt_install python3-pip || true
        if ! { "$PY" -m pip install --break-system-packages slixmpp ||
            "$PY" -m pip install slixmpp; }; then
            PY="$(command -v python3)"
            "$PY" -m pip install slixmpp || die "could not install slixmpp with pip"
        fi
        "$PY" -c 'import slixmpp' || die "$PY still cannot import slixmpp"
    fi
    command -v prosody >/dev/null || die "prosody not on PATH after install"
    command -v prosodyctl >/dev/null || die "prosodyctl not on PATH after install"
    id prosody >/dev/null 2>&1 || die "user 'prosody' missing (the Debian package creates it)"
}

# ---------------------------------------------------------------- processes

TMP=""
PIDS=()
PROXY_PID=""
SHOW_LOGS=1     # print the log tails at exit unless every check passed
SETUP_ERROR=""
SUMMARY=""      # the final "<N> passed, <M> failed" line

print_logs() {
    local f
    [ -n "$TMP" ] && [ -d "$TMP" ] || return 0
    for f in "$TMP"/proxy.log "$TMP"/proxy2.log "$TMP"/proxy3.log "$TMP"/node1/prosody.log "$TMP"/node2/prosody.log \
        "$TMP"/node1/stderr.log "$TMP"/node2/stderr.log; do
        [ -s "$f" ] || continue
        echo "----- tail of $f -----" >&2
        tail -n 60 "$f" >&2 || true
    done
}

# wait_exit PID TENTHS: wait up to TENTHS/10 s for PID to exit.
wait_exit() {
    local i
    for ((i = 0; i < $2; i++)); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.1
    done
    return 1
}

cleanup() {
    local rc=$?
    set +e
    if [ "$rc" != 0 ] || [ "$SHOW_LOGS" != 0 ]; then
        print_logs
    fi
    local pid f
    # The proxy first; then Prosody itself (by its pidfile: runuser then reaps
    # it and exits); whatever is left gets TERM, then KILL.
    [ -n "$PROXY_PID" ] && kill "$PROXY_PID" 2>/dev/null
    for f in "$TMP"/node1/prosody.pid "$TMP"/node2/prosody.pid; do
        [ -n "$TMP" ] && [ -s "$f" ] && kill "$(cat "$f")" 2>/dev/null
    done
    # ejabberd, if its phase started it.
    if [ "${#EJ[@]}" -gt 0 ]; then
        (cd "$TMP/ejabberd" && "${EJ[@]}" stop) >/dev/null 2>&1
        epmd -kill >/dev/null 2>&1
    fi
    for pid in "${PIDS[@]}"; do
        wait_exit "$pid" 50 || kill "$pid" 2>/dev/null
        wait_exit "$pid" 30 || kill -9 "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    if [ -n "$TMP" ] && [ -d "$TMP" ]; then
        if [ "${INTEROP_KEEP_TMP:-0}" = 1 ]; then
            log "kept $TMP"
        else
            rm -rf "$TMP"
        fi
    fi
    if [ -z "$SUMMARY" ]; then
        # setup failed before the client checks could run
        echo "FAIL setup: ${SETUP_ERROR:-a setup step failed (exit status $rc), see the messages above}"
        SUMMARY="0 passed, 1 failed"
        [ "$rc" != 0 ] || rc=1
    fi
    echo "$SUMMARY"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# free_ports N: print N distinct free TCP ports on 127.0.0.1 (one per line).
free_ports() {
    "$PY" - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print("\n".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
EOF
}

# wait_port PORT WHAT PID SECONDS: wait until 127.0.0.1:PORT accepts connections.
wait_port() {
    local port=$1 what=$2 pid=$3 secs=$4
    if ! "$PY" - "$port" "$secs" "$pid" <<'EOF'; then
import os, socket, sys, time
port, secs, pid = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
deadline = time.monotonic() + secs
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("process %d exited" % pid)
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.2)
sys.exit("timed out after %gs" % secs)
EOF
        die "$what did not accept connections on 127.0.0.1:$port"
    fi
}

EJ=()

# Users of the re-login phase (slixmpp clients moved by a crash).
RELOGIN_USERS="u00 u01 u02 u03 u04 u05 u06 u07"
# Users of the faults phase: chatting pairs assigned to node 1 and to node 2.
FAULT_NODE1_USERS="f10 f11 f12 f13"
FAULT_NODE2_USERS="f20 f21 f22 f23"

start_prosody() {
    local name=$1 port=$2 dir="$TMP/$1"
    mkdir -p "$dir/data" "$dir/certs"
    sed -e "s|@NAME@|$name|g" -e "s|@DIR@|$dir|g" -e "s|@C2S_PORT@|$port|g" \
        -e "s|@GROUPS_FILE@|$TMP/groups.txt|g" \
        "$HERE/prosody.cfg.lua.in" >"$dir/prosody.cfg.lua"
    chown -R prosody: "$dir"
    local u
    for u in alice bob carol $RELOGIN_USERS $FAULT_NODE1_USERS $FAULT_NODE2_USERS; do
        prosodyctl --config "$dir/prosody.cfg.lua" register "$u" example.com pw >>"$dir/stderr.log" 2>&1 ||
            die "prosodyctl register $u on $name failed (see $dir/stderr.log)"
    done
    runuser -u prosody -- prosody --config "$dir/prosody.cfg.lua" >>"$dir/stderr.log" 2>&1 &
    PIDS+=($!)
    wait_port "$port" "Prosody $name" "$!" 20
    log "Prosody $name: c2s on 127.0.0.1:$port"
}

build_proxy() {
    if [ -n "${PRG_PROXY_BIN:-}" ]; then
        [ -x "$PRG_PROXY_BIN" ] || die "PRG_PROXY_BIN=$PRG_PROXY_BIN is not executable"
        echo "$PRG_PROXY_BIN"
        return
    fi
    [ -f "$REPO/Cargo.toml" ] || die "no Cargo.toml in $REPO"
    if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
        PATH="$HOME/.cargo/bin:$PATH"
    fi
    command -v cargo >/dev/null || die "cargo not found (install Rust, or set PRG_PROXY_BIN)"
    log "building prg-proxy (cargo build --release)"
    (cd "$REPO" && cargo build --release --bin prg-proxy >&2) || die "cargo build failed"
    echo "${CARGO_TARGET_DIR:-$REPO/target}/release/prg-proxy"
}

write_proxy_config() {
    local file=$1 n1=$2 n2=$3 starttls=$4 direct=$5
    cat >"$file" <<EOF
[group]
name = "interop"
description = "two Prosody nodes on loopback"
high_availability = true
assignment = "${ASSIGNMENT:-active-standby}"
domains = ["example.com"]
${GROUP_EXTRA:-}

[[nodes]]
name = "prosody1"
address = "127.0.0.1:$n1"

[[nodes]]
name = "prosody2"
address = "127.0.0.1:$n2"
${NODE2_EXTRA:-}

[listen]
starttls = "127.0.0.1:$starttls"
direct_tls = "127.0.0.1:$direct"

[tls]
cert = "$CERT"
key = "$KEY"

[admin]
listen = "127.0.0.1:$ADMIN_PORT"

# Short timers, so that the failover checks finish in seconds.
[srm]
heartbeat_interval = "1s"
heartbeat_timeout = "5s"
initial_heartbeat_timeout = "10s"
${PROXY_EXTRA:-}
EOF
}

start_proxy() {
    local logfile=$1
    write_proxy_config "$TMP/proxy.toml" "$NODE1_PORT" "$NODE2_PORT" "$STARTTLS_PORT" "$DIRECT_TLS_PORT"
    log "starting $PROXY_BIN run --config $TMP/proxy.toml"
    NO_COLOR=1 RUST_LOG="${RUST_LOG:-info}" "$PROXY_BIN" run --config "$TMP/proxy.toml" >"$logfile" 2>&1 &
    PROXY_PID=$!
    PIDS+=("$PROXY_PID")
    wait_port "$STARTTLS_PORT" "prg-proxy (STARTTLS listener)" "$PROXY_PID" 30
    wait_port "$DIRECT_TLS_PORT" "prg-proxy (direct TLS listener)" "$PROXY_PID" 10
}

# ---------------------------------------------------------------- main

ensure_deps
log "prosody $(prosodyctl about 2>/dev/null | sed -n 's/^Prosody \(.*\)$/\1/p' | head -n1)," \
    "slixmpp $("$PY" -c 'import slixmpp; print(slixmpp.__version__)'), $("$PY" --version)"

PROXY_BIN=""
if [ "$MODE" = proxy ]; then
    # build before starting anything, so a failed build leaves nothing running
    PROXY_BIN="$(build_proxy)"
    [ -x "$PROXY_BIN" ] || die "no proxy binary at $PROXY_BIN"
fi

TMP="$(mktemp -d /tmp/prg-interop.XXXXXX)"
chmod 755 "$TMP"
cp "$HERE/groups.txt" "$TMP/groups.txt"
chmod 644 "$TMP/groups.txt"

if [ "$MODE" = proxy ]; then
    CERT="$REPO/certs/dev-cert.pem"
    KEY="$REPO/certs/dev-key.pem"
    CA="$REPO/certs/dev-ca.pem" # the clients verify the proxy's certificate with it
    if [ ! -f "$CERT" ] || [ ! -f "$KEY" ]; then
        # Not committed (yet): a throw-away self-signed certificate will do, the
        # test clients do not verify it.
        log "no $CERT / $KEY: generating a temporary self-signed certificate"
        command -v openssl >/dev/null || apt_install openssl
        CERT="$TMP/dev-cert.pem"
        KEY="$TMP/dev-key.pem"
        CA="$CERT"
        openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=example.com" \
            -addext "subjectAltName=DNS:example.com,DNS:localhost,IP:127.0.0.1" \
            -keyout "$KEY" -out "$CERT" >/dev/null 2>&1 || die "openssl could not make a certificate"
    fi
fi

mapfile -t PORTS < <(free_ports 5)
NODE1_PORT=${PORTS[0]}
NODE2_PORT=${PORTS[1]}
STARTTLS_PORT=${PORTS[2]}
DIRECT_TLS_PORT=${PORTS[3]}
ADMIN_PORT=${PORTS[4]}

start_prosody node1 "$NODE1_PORT"
start_prosody node2 "$NODE2_PORT"

CLIENT_ARGS=(--domain example.com --timeout "$CHECK_TIMEOUT")
if [ "$MODE" = proxy ]; then
    start_proxy "$TMP/proxy.log"
    log "prg-proxy: STARTTLS on 127.0.0.1:$STARTTLS_PORT, direct TLS on 127.0.0.1:$DIRECT_TLS_PORT"
    CLIENT_ARGS+=(--host 127.0.0.1 --port "$STARTTLS_PORT" --direct-tls-port "$DIRECT_TLS_PORT")
    if [ -f "$CA" ]; then
        CLIENT_ARGS+=(--ca "$CA")
    else
        log "no $CA: the clients accept the proxy's certificate unverified"
    fi
else
    CLIENT_ARGS+=(--host 127.0.0.1 --port "$NODE1_PORT" --no-tls)
fi

# A proxy that is listening may still be probing the nodes for their SASL
# mechanisms: wait (bounded) until a client would be offered some.
if [ "$MODE" = proxy ]; then
    "$PY" "$HERE/clients.py" "${CLIENT_ARGS[@]}" --wait-ready 60 ||
        die "prg-proxy listens but offers no SASL mechanisms after STARTTLS"
fi

OUT="$TMP/clients.out"
set +e
"$PY" "$HERE/clients.py" "${CLIENT_ARGS[@]}" --no-summary | tee "$OUT"
set -e

# The servers must have survived everything the clients did.
check_alive() {
    if kill -0 "$2" 2>/dev/null; then
        echo "PASS $1" | tee -a "$OUT"
    else
        echo "FAIL $1: process $2 has exited" | tee -a "$OUT"
    fi
}
check_alive prosody1-still-running "${PIDS[0]}"
check_alive prosody2-still-running "${PIDS[1]}"
if [ "$MODE" = proxy ]; then
    check_alive prg-proxy-still-running "$PROXY_PID"
fi

# assignment = "active-standby": every user is served by the first node.
check_routing() {
    local who missing="" on2
    for who in alice bob carol; do
        grep -q "Authenticated as $who@example.com" "$TMP/node1/prosody.log" || missing+=" $who"
    done
    on2=$(grep -o "Authenticated as [^ ]*" "$TMP/node2/prosody.log" | sed "s/^Authenticated as //" | sort -u | tr '\n' ' ' || true)
    if [ -z "$missing" ] && [ -z "$on2" ]; then
        echo "PASS active-standby-sessions-on-prosody1" | tee -a "$OUT"
    else
        echo "FAIL active-standby-sessions-on-prosody1: not on prosody1:${missing:- -}; on prosody2: ${on2:--}" |
            tee -a "$OUT"
    fi
}
if [ "$MODE" = proxy ]; then
    check_routing
fi

# Failover: node 1 crashes (SIGKILL), then, on a fresh node 1 and proxy,
# node 1 hangs silently (SIGSTOP). Each time the proxy must reach the
# "node lost from the network" row and move node 1's users to node 2.
failover_phase() {
    local sig=$1 logfile=$2
    set +e
    "$PY" "$HERE/failover.py" --port "$STARTTLS_PORT" --domain example.com \
        ${CA:+--ca "$CA"} --signal "$sig" --timeout "$CHECK_TIMEOUT" \
        --node1-pidfile "$TMP/node1/prosody.pid" --node2-log "$TMP/node2/prosody.log" \
        --proxy-log "$logfile" | tee -a "$OUT"
    set -e
}
# Fallback through the admin API: after the crash phase node 1 comes back,
# the group waits with node 1 Failed Over, and the administrator falls back
# with the command line; both nodes must then be Normal.
node_states() {
    "$PROXY_BIN" status --admin "http://127.0.0.1:$ADMIN_PORT" --json 2>/dev/null |
        "$PY" -c 'import json,sys; print(" / ".join(n["state_text"] for n in json.load(sys.stdin)["nodes"]))'
}
wait_states() {
    local want=$1 i
    for i in $(seq 1 $((CHECK_TIMEOUT * 10))); do
        [ "$(node_states)" = "$want" ] && return 0
        sleep 0.1
    done
    return 1
}
# restart_node1: whatever is left of Prosody node 1 (stopped, hung or
# dead) is killed, and a fresh one started on the same port and data.
restart_node1() {
    local pid
    pid=$(cat "$TMP/node1/prosody.pid" 2>/dev/null || true)
    if [ -n "$pid" ]; then
        kill -CONT "$pid" 2>/dev/null || true
        kill -9 "$pid" 2>/dev/null || true
        wait_exit "$pid" 50 || true
    fi
    rm -f "$TMP/node1/prosody.pid"
    start_prosody node1 "$NODE1_PORT"
}
fallback_phase() {
    local out
    restart_node1
    if ! wait_states "Failed Over / Running in Backup Mode"; then
        echo "FAIL api-fallback-after-restart: node 1 never showed Failed Over (states: $(node_states))" | tee -a "$OUT"
        return
    fi
    if ! out=$("$PROXY_BIN" fallback prosody1 --admin "http://127.0.0.1:$ADMIN_PORT" 2>&1); then
        echo "FAIL api-fallback-after-restart: prg-proxy fallback prosody1: $out" | tee -a "$OUT"
        return
    fi
    if wait_states "Normal / Normal"; then
        echo "PASS api-fallback-after-restart" | tee -a "$OUT"
        log "after prg-proxy fallback prosody1: $(node_states)"
    else
        echo "FAIL api-fallback-after-restart: states after the fallback: $(node_states)" | tee -a "$OUT"
    fi
}

# restart_node1_and_proxy [LOGFILE]: a fresh node 1 and a fresh proxy
# (logging to LOGFILE, default proxy2.log) with the current settings.
restart_node1_and_proxy() {
    kill "$PROXY_PID" 2>/dev/null || true
    wait_exit "$PROXY_PID" 100 || kill -9 "$PROXY_PID" 2>/dev/null || true
    restart_node1
    start_proxy "${1:-$TMP/proxy2.log}"
    "$PY" "$HERE/clients.py" "${CLIENT_ARGS[@]}" --wait-ready 60 ||
        die "prg-proxy offers no SASL mechanisms after the restart"
}
# Re-login: slixmpp applications that reconnect when disconnected (slixmpp
# itself does not) are relayed to node 1, which is SIGKILLed. Each must get
# a stream error with a re-login hint in prosody2's window (fixed, 2-8 s),
# come back at once by its own logic, be held by the pacer until its slot,
# and get in to prosody2.
relogin_phase() {
    set +e
    "$PY" "$HERE/relogin.py" --port "$STARTTLS_PORT" --domain example.com \
        ${CA:+--ca "$CA"} --timeout "$CHECK_TIMEOUT" --users $RELOGIN_USERS \
        --node1-pidfile "$TMP/node1/prosody.pid" --node2-log "$TMP/node2/prosody.log" |
        tee -a "$OUT"
    set -e
}
# Faults while clients chat: four users of node 1 and four of node 2
# (assignment file) chat in pairs while node 1 is SIGKILLed, restarted
# (the group falls back by itself: auto_fallback after 3 s), then
# SIGSTOPped and resumed. Node 1's clients must be told with a re-login
# hint, node 2's must chat on without an error or a lost message, the hang
# must be seen within the heartbeat timeout, and after SIGCONT the admin
# API must show node 1 healthy and the group back to Normal by itself.
faults_phase() {
    set +e
    "$PY" "$HERE/faults.py" --port "$STARTTLS_PORT" --admin-port "$ADMIN_PORT" --domain example.com \
        ${CA:+--ca "$CA"} --signal "$1" --timeout "$CHECK_TIMEOUT" \
        --node1-users $FAULT_NODE1_USERS --node2-users $FAULT_NODE2_USERS \
        --node1-pidfile "$TMP/node1/prosody.pid" --proxy-log "$TMP/proxy3.log" \
        --heartbeat-timeout 5 --auto-fallback-after 3 | tee -a "$OUT"
    set -e
}
faults_setup() {
    local u
    {
        echo "[users]"
        for u in $FAULT_NODE1_USERS; do echo "\"$u@example.com\" = \"prosody1\""; done
        for u in $FAULT_NODE2_USERS; do echo "\"$u@example.com\" = \"prosody2\""; done
    } >"$TMP/assignments.toml"
    ASSIGNMENT=none
    GROUP_EXTRA="assignment_file = \"$TMP/assignments.toml\""
    NODE2_EXTRA=""
    PROXY_EXTRA=$'auto_fallback = true\nauto_fallback_after = "3s"'
    restart_node1_and_proxy "$TMP/proxy3.log"
}
# After the crash: node 1 restarted, the group falls back by itself.
restart_node1_for_auto_fallback() {
    restart_node1
    if wait_states "Normal / Normal"; then
        echo "PASS kill-auto-fallback-after-restart" | tee -a "$OUT"
    else
        echo "FAIL kill-auto-fallback-after-restart: states: $(node_states)" | tee -a "$OUT"
    fi
}

if [ "$MODE" = proxy ]; then
    failover_phase KILL "$TMP/proxy.log"
    fallback_phase
    restart_node1_and_proxy
    failover_phase STOP "$TMP/proxy2.log"
    NODE2_EXTRA=$'relogin_lower = "2s"\nrelogin_upper = "8s"'
    PROXY_EXTRA=$'\n[failover]\nwindow = "fixed"'
    restart_node1_and_proxy
    relogin_phase
    faults_setup
    faults_phase KILL
    restart_node1_for_auto_fallback
    faults_phase STOP
fi

# PROXY protocol v2 against a real server that reads it: ejabberd with
# use_proxy_protocol on its c2s listener, in a one-node group with
# proxy_protocol = true. ejabberd must log the client's own address as the
# source of the relayed connection, and answer the proxy's heartbeats (the
# group reaches Normal).
ejabberd_phase() {
    command -v ejabberdctl >/dev/null 2>&1 || apt_install ejabberd
    local dir="$TMP/ejabberd" port proxy_port pid out client
    mapfile -t EJ_PORTS < <(free_ports 2)
    port=${EJ_PORTS[0]}
    proxy_port=${EJ_PORTS[1]}
    mkdir -p "$dir/db" "$dir/log"
    cat "$REPO/certs/dev-cert.pem" "$REPO/certs/dev-key.pem" >"$dir/cert.pem"
    cat >"$dir/ejabberd.yml" <<EOF
hosts:
  - "example.com"
loglevel: info
certfiles:
  - "$dir/cert.pem"
listen:
  -
    port: $port
    ip: "127.0.0.1"
    module: ejabberd_c2s
    use_proxy_protocol: true
auth_method: internal
modules:
  mod_roster: {}
  mod_ping: {}
  mod_disco: {}
EOF
    chown -R ejabberd: "$dir"
    EJ=(runuser -u ejabberd -- ejabberdctl --config-dir "$dir" --config "$dir/ejabberd.yml" --spool "$dir/db" --logs "$dir/log")
    (cd "$dir" && "${EJ[@]}" start) >>"$dir/ctl.log" 2>&1 || true
    local i
    for i in $(seq 1 60); do
        (cd "$dir" && "${EJ[@]}" status) >>"$dir/ctl.log" 2>&1 && break
        sleep 0.5
    done
    (cd "$dir" && "${EJ[@]}" register alice example.com pw) >>"$dir/ctl.log" 2>&1 || true
    wait_port "$port" "ejabberd" "$$" 30
    cat >"$dir/proxy.toml" <<EOF
[group]
name = "ejabberd"
assignment = "active-standby"
domains = ["example.com"]

[[nodes]]
name = "ejabberd1"
address = "127.0.0.1:$port"
proxy_protocol = true

[listen]
starttls = "127.0.0.1:$proxy_port"

[tls]
cert = "$CERT"
key = "$KEY"

[admin]
enabled = false

[srm]
heartbeat_interval = "1s"
EOF
    NO_COLOR=1 RUST_LOG=info "$PROXY_BIN" run --config "$dir/proxy.toml" >"$dir/proxy.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait_port "$proxy_port" "prg-proxy (ejabberd group)" "$pid" 30
    set +e
    out=$("$PY" "$HERE/proxy_protocol.py" --port "$proxy_port" ${CA:+--ca "$CA"} --timeout "$CHECK_TIMEOUT" 2>&1)
    set -e
    client=$(printf '%s\n' "$out" | sed -n 's/^client //p')
    if [ -n "$client" ] && grep -q "Accepted proxied connection $client ->" "$dir/log/ejabberd.log"; then
        echo "PASS proxy-protocol-ejabberd-sees-the-client-address" | tee -a "$OUT"
        log "ejabberd: $(grep "Accepted proxied connection $client" "$dir/log/ejabberd.log" | sed 's/.*\(Accepted proxied.*\)/\1/')"
    else
        echo "FAIL proxy-protocol-ejabberd-sees-the-client-address: client ${client:-none} ($out); ejabberd: $(grep -c 'Accepted proxied' "$dir/log/ejabberd.log" 2>/dev/null) proxied connections" | tee -a "$OUT"
    fi
    for i in $(seq 1 $((CHECK_TIMEOUT * 10))); do
        grep -q "to.state=Normal" "$dir/proxy.log" && break
        sleep 0.1
    done
    if grep -q "to.state=Normal" "$dir/proxy.log"; then
        echo "PASS proxy-protocol-ejabberd-answers-the-heartbeats" | tee -a "$OUT"
    else
        echo "FAIL proxy-protocol-ejabberd-answers-the-heartbeats: $(grep -m1 'heartbeat failed' "$dir/proxy.log")" | tee -a "$OUT"
    fi
    kill "$pid" 2>/dev/null || true
    (cd "$dir" && "${EJ[@]}" stop) >>"$dir/ctl.log" 2>&1 || true
    epmd -kill >/dev/null 2>&1 || true
    EJ=()
}
if [ "$MODE" = proxy ]; then
    ejabberd_phase
fi

PASSED=$(grep -c '^PASS ' "$OUT" || true)
FAILED=$(grep -c '^FAIL ' "$OUT" || true)
SUMMARY="$PASSED passed, $FAILED failed"
if [ "$FAILED" = 0 ] && [ "$PASSED" -gt 0 ]; then
    SHOW_LOGS=0
    exit 0
fi
exit 1
