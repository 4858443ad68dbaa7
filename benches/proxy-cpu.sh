#!/usr/bin/env bash
# How much CPU the proxy spends per operation, for two builds side by side.
#
#   benches/proxy-cpu.sh SCENARIO BIN [BIN...] [-- loadgen run args]
#   benches/proxy-cpu.sh connect-bulk target/release/egress-proxy /tmp/old-egress-proxy -- --conns 4
#
# Runs the project's load generator and origins (benches/loadgen) on CPU 0
# and each proxy binary on CPU 1, like benches/compare.sh, and prints the
# rate beside the proxy's user and system CPU seconds (from /proc/PID/stat)
# and CPU microseconds per operation. compare.sh gives ratios against direct
# and the peers; this tells what a change did to the proxy's own cost, which
# compare.sh cannot show once core 0 (load and origins) is the bottleneck.
# Runs ROUNDS (default 2) alternating rounds of DURATION (default 5) seconds.
# tls-rate goes to loadgen's TLS origin through the bypass rule; SNIS="match-if-tls
# off" runs each binary with each of the rule's sni values (the SNI peek's cost).
# inspect-rate and inspect-rr go to it through an allow rule with a [tls] CA (made
# by the first binary's `ca generate`), so every tunnel is inspected; TICKETS=N
# makes the TLS origin send N session tickets per handshake (default 0), so the
# proxy's side can resume (benches/compare.sh --origin-tickets, the same).
set -euo pipefail
if (($# < 2)) || [[ $1 == -h || $1 == --help ]]; then
  sed -n '2,19p' "$0" | cut -c3-
  exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
sc=$1; shift
bins=()
while (($#)) && [[ $1 != -- ]]; do bins+=("$1"); shift; done
[[ ${1:-} == -- ]] && shift
cargo build --release --locked --quiet --manifest-path "$root/benches/loadgen/Cargo.toml"
lg=${CARGO_TARGET_DIR:-$root/benches/loadgen/target}/release/loadgen
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$tmp"' EXIT
cat >"$tmp/egress-proxy.toml" <<TOML
[server]
listen = ["127.0.0.1:13128"]
admin_listen = "127.0.0.1:13129"
[clients]
allow = ["127.0.0.0/8"]
[dns]
static = { "origin.test" = ["127.0.0.1"] }
allow_private = ["127.0.0.0/8"]
[policy]
catalog = "catalog.toml"
[audit]
path = "$tmp/audit.log"
TOML
inspect=0
[[ $sc == inspect-* ]] && inspect=1
catalog() { # catalog SNI
  cat <<TOML
[[rule]]
name = "bench http origin"
hosts = ["origin.test"]
ports = [18080]
action = "allow"
[[rule]]
name = "bench cloud look-up"
hosts = ["origin.test"]
ports = [18081, 18082$( ((inspect)) || echo ", 18443")]
action = "bypass"
sni = "$1"
TOML
  ((inspect)) && printf '%s\n' '[[rule]]' 'name = "bench inspected"' 'hosts = ["origin.test"]' \
    'ports = [18443]' 'action = "allow"'
  return 0
}
extra=()
lsc=$sc # the load generator's scenario
case $sc in
  http-forward) target=origin.test:18080; key=rate ;;
  connect-bulk) target=origin.test:18082; key=gbit_s ;;
  tls-rate | tls-rr) target=origin.test:18443; key=rate; extra=(--ca "$tmp/origin-ca.pem") ;;
  inspect-rate | inspect-rr)
    target=origin.test:18443 key=rate lsc=tls-${sc#inspect-}
    extra=(--ca "$tmp/ca/ca.pem")
    "${bins[0]}" ca generate --out "$tmp/ca" >/dev/null
    printf '%s\n' '[tls]' "ca_cert = \"$tmp/ca/ca.pem\"" "ca_key = \"$tmp/ca/ca.key\"" \
      "extra_roots = [\"$tmp/origin-ca.pem\"]" >>"$tmp/egress-proxy.toml"
    ;;
  *) target=origin.test:18081; key=rate ;;
esac
taskset -c 0 "$lg" origins --http 127.0.0.1:18080 --echo 127.0.0.1:18081 --source 127.0.0.1:18082 \
  --tls 127.0.0.1:18443 --tls-ca-out "$tmp/origin-ca.pem" --tls-tickets "${TICKETS:-0}" >/dev/null 2>&1 &
sleep 0.3
printf '%-48s %12s %8s %8s %12s\n' binary "$key" user_s sys_s cpu_us/op
for _ in $(seq "${ROUNDS:-2}"); do
  for bin in "${bins[@]}"; do
    for sni in ${SNIS:-match-if-tls}; do
      catalog "$sni" >"$tmp/catalog.toml"
      taskset -c 1 "$bin" run --config "$tmp/egress-proxy.toml" >/dev/null 2>"$tmp/stderr.log" &
      pid=$!
      for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/13128) 2>/dev/null && break; sleep 0.1; done
      read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$pid/stat")
      taskset -c 0 "$lg" run --scenario "$lsc" --proxy 127.0.0.1:13128 --target "$target" \
        --duration "${DURATION:-5}" --json "${extra[@]}" "$@" >"$tmp/out.json"
      read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$pid/stat")
      kill "$pid"; wait "$pid" 2>/dev/null || true
      hz=$(getconf CLK_TCK)
      label=$bin
      [[ -n ${SNIS:-} ]] && label="$bin sni=$sni"
      python3 - "$tmp/out.json" "$key" "$label" $((u1 - u0)) $((s1 - s0)) "$hz" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); key, name = sys.argv[2], sys.argv[3]
user, sys_, hz = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
ops = d.get("ok") or d.get("bytes", 0) / 65536  # bulk: per 64 KiB moved
cpu = (user + sys_) / hz
print("%-48s %12.1f %8.2f %8.2f %12.2f" % (name[-48:], d.get(key, 0), user / hz, sys_ / hz,
      1e6 * cpu / ops if ops else float("nan")))
PY
    done
  done
done
