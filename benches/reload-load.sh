#!/usr/bin/env bash
# Reloads under load: the release proxy with a large vendor-shaped catalog
# (10,000 rules by default) that also admits the load generator's echo
# origin, the loadgen connect-rate scenario once without reloads and once
# while the proxy gets a SIGHUP every second; prints a markdown table of
# tunnels/s, p50, p99, failed transactions and the reloads that happened
# (egress_reloads_total on /metrics), with the reload run's ratios to the
# quiet run. Pinned like benches/compare.sh: the proxy on CPU 1, the load
# generator and origins on CPU 0. See README.md, "Performance".
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: benches/reload-load.sh [options]

  --duration SECS     seconds per run (default 10)
  --rules N           generated catalog rules besides the origin's (default 10000)
  --conns N           connect-rate workers (default 16)
  --every SECS        seconds between SIGHUPs in the reload run (default 1)
  --rounds N          quiet/reload pairs, alternating (default 1)
  --egress-bin PATH   the proxy binary (default target/release/egress-proxy; built when missing)
  --origin-port P     the echo origin's port (default 18091)
  --no-pin            no taskset pinning
  --keep              keep the scratch dir (config, catalog, logs) and print its path
  -h, --help          this help
EOF
}

DURATION=10 RULES=10000 CONNS=16 EVERY=1 ROUNDS=1 EGRESS_BIN="" ECHO_PORT=18091 PIN=1 KEEP=0
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --no-pin) PIN=0; shift; continue ;;
    --keep) KEEP=1; shift; continue ;;
    --duration | --rules | --conns | --every | --rounds | --egress-bin | --origin-port)
      (($# >= 2)) || { echo "$1 needs a value" >&2; exit 2; } ;;
    *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
  esac
  case $1 in
    --duration) DURATION=$2 ;;
    --rules) RULES=$2 ;;
    --conns) CONNS=$2 ;;
    --every) EVERY=$2 ;;
    --rounds) ROUNDS=$2 ;;
    --egress-bin) EGRESS_BIN=$2 ;;
    --origin-port) ECHO_PORT=$2 ;;
  esac
  shift 2
done
for n in "$RULES" "$CONNS" "$ROUNDS" "$ECHO_PORT"; do
  [[ $n =~ ^[0-9]+$ ]] || { echo "counts and ports must be integers, got: $n" >&2; exit 2; }
done

log() { echo "[reload-load] $*" >&2; }
die() { log "error: $*"; exit 1; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
log "building benches/loadgen (release)"
cargo build --release --locked --quiet --manifest-path "$ROOT/benches/loadgen/Cargo.toml"
LOADGEN=${CARGO_TARGET_DIR:-$ROOT/benches/loadgen/target}/release/loadgen
if [[ -z $EGRESS_BIN ]]; then
  EGRESS_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/egress-proxy
  if [[ ! -x $EGRESS_BIN ]]; then
    log "building egress-proxy (release; fat LTO takes minutes)"
    cargo build --release --locked --quiet --manifest-path "$ROOT/Cargo.toml"
  fi
fi
[[ -x $EGRESS_BIN ]] || die "--egress-bin $EGRESS_BIN is not an executable"

if ((PIN)); then CLIENT_PIN=(taskset -c 0) PROXY_PIN=(taskset -c 1); else CLIENT_PIN=() PROXY_PIN=(); fi

TMPBASE=/dev/shm
[[ -d $TMPBASE && -w $TMPBASE ]] || TMPBASE=${TMPDIR:-/tmp}
TMP=$(mktemp -d "$TMPBASE/egress-reload.XXXXXX")
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if ((KEEP)); then log "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

listening() { ss -Htln "sport = :$1" | grep -q .; }
# await_listen PORT PID NAME LOG: until PID listens on PORT (15 s at most)
await_listen() {
  for _ in {1..150}; do
    kill -0 "$2" 2>/dev/null || { tail -n 20 "$4" >&2 || true; die "$3 exited while starting"; }
    listening "$1" && return 0
    sleep 0.1
  done
  die "$3 did not listen on port $1 within 15 s (log: $4)"
}
free_port() { # free_port VAR
  local p
  while :; do
    p=$((20000 + RANDOM % 12000))
    listening "$p" || { printf -v "$1" %s "$p"; return; }
  done
}

! listening "$ECHO_PORT" || die "origin port $ECHO_PORT is in use (see --origin-port)"
"${CLIENT_PIN[@]}" "$LOADGEN" origins --echo "127.0.0.1:$ECHO_PORT" 2>"$TMP/origins.log" &
PIDS+=($!)
await_listen "$ECHO_PORT" $! origins "$TMP/origins.log"

# The catalog: RULES rules shaped like benches/support/catalog.rs's vendor_catalog,
# then the rule that admits the echo origin.
python3 - "$RULES" "$ECHO_PORT" >"$TMP/catalog.toml" <<'PY'
import sys
n, port = int(sys.argv[1]), int(sys.argv[2])
out = []
for i in range(n):
    v, p = i // 100, i // 10
    if i % 16 == 15:
        hosts, action = [f"blocked.dl{i - 1}.vendor{v}.net"], "deny"
    elif (i % 16) % 3 == 0:
        hosts, action = [f"ksn{i}.svc{p}.vendor{v}.com", f"ksn{i}-geo.svc{p}.vendor{v}.com"], "bypass"
    elif (i % 16) % 3 == 1:
        hosts, action = [f"*.zone{i}.vendor{v}.com"], "bypass"
    else:
        hosts, action = [f"update{i}.svc{p}.vendor{v}.com", f"*.dl{i}.vendor{v}.net", f"dl{i}.vendor{v}.net"], "allow"
    if i % 16 == 15:
        ports = "[80, 443]"
    else:
        ports = ["[443]", "[443]", "[443]", "[80, 443]", '["8000-8010", 443]'][i % 5]
    quoted = ", ".join(f'"{h}"' for h in hosts)
    out.append(f'[[rule]]\nname = "vendor {i}"\nhosts = [{quoted}]\nports = {ports}\naction = "{action}"\n')
    if action == "bypass" and i % 4 == 0:
        out.append('sni = "require"\n')
    if i % 7 == 0:
        out.append(f'ips = ["198.51.{i // 250 % 256}.{i % 250}"]\n')
    out.append("\n")
out.append(f'[[rule]]\nname = "bench tunnels"\nhosts = ["origin.test"]\nports = [{port}]\naction = "bypass"\n')
sys.stdout.write("".join(out))
PY

free_port PORT
ADMIN=""
while [[ -z $ADMIN || $ADMIN == "$PORT" ]]; do free_port ADMIN; done
cat >"$TMP/egress-proxy.toml" <<EOF
[server]
listen = ["127.0.0.1:$PORT"]
admin_listen = "127.0.0.1:$ADMIN"

[clients]
allow = ["127.0.0.0/8"]

[dns]
static = { "origin.test" = ["127.0.0.1"] }
allow_private = ["127.0.0.0/8"]

[policy]
catalog = "catalog.toml"
default = "deny"

[audit]
path = "$TMP/audit.log"
EOF
"$EGRESS_BIN" check --config "$TMP/egress-proxy.toml" >"$TMP/check.log" 2>&1 ||
  die "the generated configuration does not check: $(tail -n 5 "$TMP/check.log")"
"${PROXY_PIN[@]}" "$EGRESS_BIN" run --config "$TMP/egress-proxy.toml" >"$TMP/stdout.log" 2>"$TMP/proxy.log" &
PROXY=$!
PIDS+=("$PROXY")
await_listen "$PORT" "$PROXY" egress-proxy "$TMP/proxy.log"
await_listen "$ADMIN" "$PROXY" egress-proxy "$TMP/proxy.log"
log "proxy $PROXY on 127.0.0.1:$PORT with $((RULES + 1)) rules ($EGRESS_BIN)"

# reloads RESULT: egress_reloads_total{result=RESULT} now
reloads() {
  curl -s "http://127.0.0.1:$ADMIN/metrics" |
    awk -v r="result=\"$1\"" 'index($0, "egress_reloads_total{") == 1 && index($0, r) { print $2; f = 1 } END { if (!f) print 0 }'
}

RESULTS=$TMP/results.tsv
: >"$RESULTS"
# measure LABEL HUP: one connect-rate run; with HUP=1 a SIGHUP every EVERY seconds meanwhile
measure() {
  local label=$1 hup=$2 ok0 fail0 hupper="" sent=0 out
  ok0=$(reloads ok) fail0=$(reloads failed)
  if ((hup)); then
    (
      n=0
      while sleep "$EVERY"; do kill -HUP "$PROXY" || exit 0; n=$((n + 1)); echo "$n" >"$TMP/sighups"; done
    ) &
    hupper=$!
  fi
  out=$(timeout $((DURATION * 3 + 60)) "${CLIENT_PIN[@]}" "$LOADGEN" run --scenario connect-rate \
    --proxy "127.0.0.1:$PORT" --target "origin.test:$ECHO_PORT" --conns "$CONNS" \
    --duration "$DURATION" --label "$label" --json 2>>"$TMP/loadgen.log") || die "loadgen failed: $(tail -n 3 "$TMP/loadgen.log")"
  if [[ -n $hupper ]]; then
    kill "$hupper" 2>/dev/null || true
    wait "$hupper" 2>/dev/null || true
    sent=$(cat "$TMP/sighups" 2>/dev/null || echo 0)
    rm -f "$TMP/sighups"
    sleep 2 # let the last reload finish before counting
  fi
  kill -0 "$PROXY" 2>/dev/null || die "the proxy exited (log: $TMP/proxy.log)"
  printf '%s\t%s\t%s\t%s\t%s\n' "$label" "$out" "$sent" \
    "$(awk -v a="$(reloads ok)" -v b="$ok0" 'BEGIN { print a - b }')" \
    "$(awk -v a="$(reloads failed)" -v b="$fail0" 'BEGIN { print a - b }')" >>"$RESULTS"
  log "$label: $out"
  sleep 1
}

for ((r = 1; r <= ROUNDS; r++)); do
  measure quiet 0
  measure reloads 1
done
done_lines=$(grep -c 'reload: done' "$TMP/proxy.log" || true)

python3 - "$RESULTS" "$RULES" "$DURATION" "$CONNS" "$EVERY" "$done_lines" "$((PIN))" <<'PY'
import json, sys
path, rules, duration, conns, every, done_lines, pin = sys.argv[1:]
rows = []
for line in open(path):
    label, out, sent, ok, failed = line.rstrip("\n").split("\t")
    rows.append((label, json.loads(out), int(sent), float(ok), float(failed)))
def us(v): return f"{v / 1000:.1f} ms" if v >= 10000 else f"{v:.0f} µs"
def rate(v): return f"{v / 1000:.2f}k/s" if v >= 10000 else f"{v:.0f}/s"
print("| run | tunnels/s | p50 | p99 | failed transactions | SIGHUPs sent | reloads done (ok / failed) |")
print("|---|---|---|---|---|---|---|")
for label, d, sent, ok, failed in rows:
    fails = d.get("errors", 0)
    print(f"| {label} | {rate(d['rate'])} | {us(d['p50_us'])} | {us(d['p99_us'])} | {fails} | "
          f"{sent if label == 'reloads' else '—'} | {ok:.0f} / {failed:.0f} |")
quiet = [d for l, d, *_ in rows if l == "quiet"]
loud = [d for l, d, *_ in rows if l == "reloads"]
if quiet and loud:
    q, l = quiet[-1], loud[-1]
    def ratio(k): return l[k] / q[k] if q.get(k) else float("nan")
    print(f"| **reloads ÷ quiet** | {ratio('rate'):.2f}× | {ratio('p50_us'):.2f}× | {ratio('p99_us'):.2f}× | | | |")
print()
print(f"connect-rate, {conns} workers, {duration} s per run; catalog of {int(rules) + 1} rules "
      f"({rules} generated + the origin's); a SIGHUP every {every} s in the reload run "
      f"('reload: done' lines in the proxy's log: {done_lines}); "
      + ("proxy pinned to CPU 1, load generator and origin to CPU 0." if pin == "1" else "no pinning."))
for label, d, *_ in rows:
    if d.get("errors"):
        print(f"- {label}: {d['errors']} failed, the first: {d.get('first_error')}")
PY
