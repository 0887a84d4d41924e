# Sourced by scripts/loadbench.sh and scripts/soak.sh: the binaries, the
# open-file limit and the CPU pinning both benches use.

# LOADBENCH_BIN / PRG_PROXY_BIN: prebuilt binaries, else a release build.
if [ -z "${LOADBENCH_BIN:-}" ] || [ -z "${PRG_PROXY_BIN:-}" ]; then
  cargo build --release --bin loadbench --bin prg-proxy
  target="${CARGO_TARGET_DIR:-target}/release"
  LOADBENCH_BIN="$target/loadbench"
  PRG_PROXY_BIN="$target/prg-proxy"
fi

# Each idle client costs the driver two descriptors (client and node side)
# and the proxy two (client and node); raise the limit as far as allowed.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
nofile=$(ulimit -n)

# One core for the relay under test, the other for nodes and clients.
relay_cpu=-1 driver=()
if command -v taskset >/dev/null 2>&1 && [ "$(nproc)" -ge 2 ]; then
  relay_cpu=0
  driver=(taskset -c 1)
fi
