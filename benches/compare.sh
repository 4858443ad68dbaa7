#!/usr/bin/env bash
# Compare egress-proxy with Squid, tinyproxy and HAProxy (from the distribution)
# and with no proxy at all, on loopback, in one run; print a markdown table of absolute
# figures and ratios to direct. Uses the project's own load generator and
# origins (benches/loadgen). Progress goes to stderr, the table to stdout.
# See README.md, "Performance".
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: benches/compare.sh [options]

Runs every scenario against every system: direct (no proxy), squid, tinyproxy
and egress (this repository's proxy), each proxy allowlisting only origin.test
on the origin ports. Needs root (apt installs, unshare/mount for tinyproxy's
hosts override; squid, tinyproxy and haproxy drop to their own users).

haproxy (not in the default list; Debian's package, one thread): http-forward
through a "mode http" frontend (absolute-form requests, an allowlist of ACLs on
the Host header's name and port, which HAProxy checks against the request
line's authority; keep-alive to the origin with "http-reuse always"). HAProxy
has no CONNECT (its probe refuses it with 403), so connect-rr, connect-bulk and
connect-rate go through "mode tcp" frontends that relay every connection
straight to the echo or source origin (the load generator connects to them as
if direct): the least a proxy can do per round trip, a floor, not a peer.

Every rate scenario has a "proxy CPU" row: the CPU time
(user + system, from /proc) of the system's process, its live descendants
(Squid's certificate helpers) and the children they reaped, from just before
the load generator starts until it ends, divided by the operations it counted
(connect-bulk: per 64 KiB moved). Operations in flight at the deadline are
not counted but their CPU is, so with many workers it reads slightly high.
The cell also gives the share of that time spent in the kernel.

TLS scenarios (not in the default list; the TLS origin is loadgen's, its
certificate for origin.test from a CA loadgen generates at start):
  tls-rate      16 workers: new connection, CONNECT, full TLS handshake with the
                origin through the tunnel (SNI origin.test, no resumption), one
                GET of 1 KiB, close. Systems: direct (TLS straight to the origin),
                squid, tinyproxy (plain CONNECT), egress (a bypass rule with the
                default sni = "match-if-tls": the proxy peeks at the ClientHello
                and checks its SNI), egress-sni-off (the same rule, sni = "off").
                The notes give egress ÷ egress-sni-off: the cost of the peek.
  inspect-rate  the same workers through an inspecting proxy, which terminates
                TLS with a leaf from its own CA (the client trusts only that CA)
                and re-originates TLS to the origin (both proxies keep their
                origin connections for later tunnels). Systems: direct,
                egress-inspect (an allow rule and a [tls] CA) and squid-bump
                (Squid's OpenSSL build, ssl_bump bump all with its own CA).
  inspect-rr    32 inspected tunnels kept alive: CONNECT and TLS once, then
                keep-alive GETs of 1 KiB. Systems as inspect-rate.
A system that a scenario does not apply to shows "—". squid-bump needs the
squid-openssl package, which conflicts with squid: it is fetched with
apt-get download into --cache-dir and unpacked there, never installed.
Example: benches/compare.sh --scenarios tls-rate,inspect-rate,inspect-rr \
           --systems direct,squid,tinyproxy,egress,egress-sni-off,egress-inspect,squid-bump

  --duration SECS        seconds per run; idle-tunnels: seconds to hold (default 5)
  --scenarios LIST       comma list (default http-forward,connect-rr,connect-bulk,connect-rate,idle-tunnels;
                         also tls-rate, inspect-rate, inspect-rr)
  --systems LIST         comma list (default direct,squid,tinyproxy,egress;
                         also haproxy, egress-sni-off, egress-inspect, squid-bump)
  --egress-bin PATH      the proxy binary (default target/release/egress-proxy; built when missing)
  --http-conns N         http-forward keep-alive connections (default 32)
  --rr-conns N           connect-rr tunnels (default 32)
  --bulk-conns N         connect-bulk tunnels (default 4)
  --rate-conns N         connect-rate workers (default 16)
  --idle-tunnels N       idle-tunnels count (default 5000)
  --origin-ports H,E,S   HTTP, echo and source origin ports (default 18080,18081,18082)
  --tls-port PORT        the TLS origin's port (default 18443)
  --origin-tickets N     TLS 1.3 session tickets the TLS origin sends per handshake (default 0:
                         nothing to resume; with N > 0 an inspecting proxy that keeps its client
                         sessions can resume its side, the load generator never does)
  --cache-dir DIR        where squid-bump's squid-openssl package is fetched and unpacked
                         (default ${XDG_CACHE_HOME:-$HOME/.cache}/egress-proxy-bench)
  --client-cpus LIST     CPUs for the load generator and origins (default 0)
  --proxy-cpus LIST      CPUs for each proxy (default 1)
  --no-pin               no taskset pinning
  --tmpdir DIR           parent of the scratch dir with configs, logs and results
                         (default /dev/shm, so logging proxies measure no disk)
  --keep                 keep the scratch dir and print its path
  -h, --help             this help

Example: benches/compare.sh --duration 2 --scenarios connect-rr --systems direct,egress
EOF
}

DURATION=5
SCENARIOS=http-forward,connect-rr,connect-bulk,connect-rate,idle-tunnels
SYSTEMS=direct,squid,tinyproxy,egress
EGRESS_BIN=""
HTTP_CONNS=32 RR_CONNS=32 BULK_CONNS=4 RATE_CONNS=16 IDLE_TUNNELS=5000
ORIGIN_PORTS=18080,18081,18082 TLS_PORT=18443 ORIGIN_TICKETS=0
# shellcheck disable=SC2034 # used by compare-tls.sh
CACHE_DIR=${XDG_CACHE_HOME:-$HOME/.cache}/egress-proxy-bench
CLIENT_CPUS=0 PROXY_CPUS=1 PIN=1 KEEP=0
TMPBASE=/dev/shm

while (($#)); do
  opt=$1
  shift
  case $opt in
    -h | --help) usage; exit 0 ;;
    --no-pin) PIN=0; continue ;;
    --keep) KEEP=1; continue ;;
    --duration | --scenarios | --systems | --egress-bin | --http-conns | --rr-conns | --bulk-conns | \
      --rate-conns | --idle-tunnels | --origin-ports | --client-cpus | --proxy-cpus | --tmpdir | \
      --tls-port | --cache-dir | --origin-tickets) ;;
    *) echo "unknown option: $opt" >&2; usage >&2; exit 2 ;;
  esac
  (($#)) || { echo "$opt needs a value (see --help)" >&2; exit 2; }
  val=$1
  shift
  # shellcheck disable=SC2034 # CACHE_DIR is used by compare-tls.sh
  case $opt in
    --duration) DURATION=$val ;;
    --scenarios) SCENARIOS=$val ;;
    --systems) SYSTEMS=$val ;;
    --egress-bin) EGRESS_BIN=$val ;;
    --http-conns) HTTP_CONNS=$val ;;
    --rr-conns) RR_CONNS=$val ;;
    --bulk-conns) BULK_CONNS=$val ;;
    --rate-conns) RATE_CONNS=$val ;;
    --idle-tunnels) IDLE_TUNNELS=$val ;;
    --origin-ports) ORIGIN_PORTS=$val ;;
    --client-cpus) CLIENT_CPUS=$val ;;
    --proxy-cpus) PROXY_CPUS=$val ;;
    --tmpdir) TMPBASE=$val ;;
    --tls-port) TLS_PORT=$val ;;
    --cache-dir) CACHE_DIR=$val ;;
    --origin-tickets) ORIGIN_TICKETS=$val ;;
  esac
done
for n in "$HTTP_CONNS" "$RR_CONNS" "$BULK_CONNS" "$RATE_CONNS" "$IDLE_TUNNELS"; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "connection counts must be positive integers, got: $n" >&2; exit 2; }
done
[[ $ORIGIN_TICKETS =~ ^[0-9]$ ]] || { echo "--origin-tickets must be 0 to 9, got: $ORIGIN_TICKETS" >&2; exit 2; }

log() { echo "[compare] $*" >&2; }
die() { log "error: $*"; exit 1; }
listed() { [[ ",$2," == *",$1,"* ]]; } # listed ITEM LIST

if ! [[ $DURATION =~ ^[0-9]+(\.[0-9]+)?$ ]] || ! awk -v d="$DURATION" 'BEGIN { exit !(d > 0 && d <= 600) }'; then
  die "--duration must be a number of seconds in (0, 600]"
fi
for sc in ${SCENARIOS//,/ }; do
  listed "$sc" http-forward,connect-rr,connect-bulk,connect-rate,idle-tunnels,tls-rate,inspect-rate,inspect-rr ||
    die "unknown scenario: $sc"
done
for sys in ${SYSTEMS//,/ }; do
  listed "$sys" direct,squid,tinyproxy,haproxy,egress,egress-sni-off,egress-inspect,squid-bump ||
    die "unknown system: $sys"
done
IFS=, read -r HTTP_PORT ECHO_PORT SOURCE_PORT <<<"$ORIGIN_PORTS"
[[ -n ${SOURCE_PORT:-} ]] || die "--origin-ports needs three ports"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOADGEN_DIR=$ROOT/benches/loadgen
# shellcheck source=compare-tls.sh source-path=SCRIPTDIR disable=SC1091
. "$ROOT/benches/compare-tls.sh"

# --- prerequisites -----------------------------------------------------------------------
need=()
listed squid "$SYSTEMS" && ! command -v squid >/dev/null && need+=(squid)
listed tinyproxy "$SYSTEMS" && ! command -v tinyproxy >/dev/null && need+=(tinyproxy)
listed haproxy "$SYSTEMS" && ! command -v haproxy >/dev/null && ! [[ -x /usr/sbin/haproxy ]] && need+=(haproxy)
listed squid-bump "$SYSTEMS" && ! command -v openssl >/dev/null && need+=(openssl)
for tool in curl:curl python3:python3 taskset:util-linux unshare:util-linux ss:iproute2; do
  command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
done
if ((${#need[@]})); then
  log "installing ${need[*]} (apt)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

log "building benches/loadgen (release)"
cargo build --release --locked --quiet --manifest-path "$LOADGEN_DIR/Cargo.toml"
LOADGEN=${CARGO_TARGET_DIR:-$LOADGEN_DIR/target}/release/loadgen

HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
HAPROXY_ECHO="" HAPROXY_SOURCE="" # its TCP relays' ports

if [[ ,$SYSTEMS, == *,egress* ]]; then
  if [[ -z $EGRESS_BIN ]]; then
    EGRESS_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/egress-proxy
    if [[ ! -x $EGRESS_BIN ]]; then
      log "building egress-proxy (release; fat LTO takes minutes)"
      cargo build --release --locked --quiet --manifest-path "$ROOT/Cargo.toml"
    fi
  fi
  [[ -x $EGRESS_BIN ]] || die "--egress-bin $EGRESS_BIN is not an executable"
  EGRESS_BIN=$(realpath "$EGRESS_BIN")
fi

# Thousands of tunnels need thousands of descriptors; the children inherit this.
ulimit -n "$(ulimit -Hn)"
NOFILE=$(ulimit -n)
((IDLE_TUNNELS * 2 + 200 <= NOFILE)) || ! listed idle-tunnels "$SCENARIOS" ||
  die "--idle-tunnels $IDLE_TUNNELS needs about $((IDLE_TUNNELS * 2 + 200)) descriptors in a proxy; the limit is $NOFILE"

if ((PIN)); then
  CLIENT_PIN=(taskset -c "$CLIENT_CPUS") PROXY_PIN=(taskset -c "$PROXY_CPUS")
else
  CLIENT_PIN=() PROXY_PIN=()
fi

# --- everything started here is stopped by PID on exit ------------------------------------
[[ -d $TMPBASE && -w $TMPBASE ]] || TMPBASE=${TMPDIR:-/tmp}
TMP=$(mktemp -d "$TMPBASE/egress-compare.XXXXXX")
chmod 755 "$TMP"
PIDS=()
# alive PID: exists and is not a zombie (a dead child stays a zombie until waited for)
alive() {
  local state
  state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [[ -n $state && $state != Z ]]
}
stop_all() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in {1..50}; do alive "$pid" || break; sleep 0.1; done # up to 5 s each
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  PIDS=()
}
cleanup() {
  stop_all
  if ((KEEP)); then log "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

listening() { ss -Htln "sport = :$1" | grep -q .; }
TAKEN=" "
# free_port VAR: an unused loopback port below the ephemeral range, stored in VAR
free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 12000))
    if [[ $TAKEN != *" $p "* ]] && ! listening "$p"; then
      TAKEN+="$p "
      printf -v "$1" %s "$p"
      return
    fi
  done
}
# await_listen PORT PID NAME LOGFILE: until PID listens on PORT (15 s at most)
await_listen() {
  for _ in {1..150}; do
    alive "$2" || { tail -n 20 "$4" >&2 || true; die "$3 exited while starting (log: $4)"; }
    listening "$1" && return 0
    sleep 0.1
  done
  die "$3 did not listen on port $1 within 15 s (log: $4)"
}

# --- origins -------------------------------------------------------------------------------
for p in "$HTTP_PORT" "$ECHO_PORT" "$SOURCE_PORT" "$TLS_PORT"; do
  ! listening "$p" || die "origin port $p is in use (see --origin-ports, --tls-port)"
done
# The TLS origin writes its CA (origin-ca.pem) before it listens.
"${CLIENT_PIN[@]}" "$LOADGEN" origins --http "127.0.0.1:$HTTP_PORT" --echo "127.0.0.1:$ECHO_PORT" \
  --source "127.0.0.1:$SOURCE_PORT" --tls "127.0.0.1:$TLS_PORT" --tls-ca-out "$TMP/origin-ca.pem" \
  --tls-tickets "$ORIGIN_TICKETS" \
  2>"$TMP/origins.log" &
PIDS+=($!)
await_listen "$SOURCE_PORT" $! origins "$TMP/origins.log"
await_listen "$TLS_PORT" $! origins "$TMP/origins.log"

# origin.test is 127.0.0.1 for every proxy: squid reads this hosts file; tinyproxy, which
# has no such option, runs in a private mount namespace where it is /etc/hosts and DNS
# points at 127.0.0.1, so no look-up leaves the machine; egress-proxy has static DNS.
echo "127.0.0.1 origin.test" >"$TMP/hosts"
echo "nameserver 127.0.0.1" >"$TMP/resolv.conf"
# shellcheck disable=SC2016 # expanded by the inner sh
HOSTS_NS=(unshare --mount --propagation private sh -c
  'mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/resolv.conf && shift 2 && exec "$@"'
  sh "$TMP/hosts" "$TMP/resolv.conf")

# --- the systems: parallel arrays of name, address ("direct" for none), PID and the CA its
# TLS clients trust (the origin's, or the proxy's own when it inspects) ----------------------
NAMES=() ADDRS=() SPIDS=() CAS=()
# The allowlist, names, logs and limits every Squid here shares (plain and
# bumping), with its files in DIR.
squid_conf_common() {
  local d=$1
  cat <<EOF
acl bench_host dstdomain origin.test
acl bench_ports port $HTTP_PORT $ECHO_PORT $SOURCE_PORT $TLS_PORT
http_access deny !bench_ports
http_access allow bench_host
http_access deny all
hosts_file $TMP/hosts
dns_nameservers 127.0.0.1
cache deny all
cache_mem 0 MB
access_log stdio:$d/access.log
cache_log $d/cache.log
cache_store_log none
pid_filename $d/squid.pid
coredump_dir $d
cache_effective_user proxy
max_filedescriptors $NOFILE
shutdown_lifetime 1 seconds
pinger_enable off
EOF
}
add_system() { NAMES+=("$1") ADDRS+=("$2") SPIDS+=("$3") CAS+=("${4:-$TMP/origin-ca.pem}"); }

for sys in ${SYSTEMS//,/ }; do
  case $sys in
    direct) add_system direct direct "" ;;

    squid)
      free_port port
      d=$TMP/squid
      install -d -o proxy -g proxy "$d"
      {
        echo "http_port 127.0.0.1:$port"
        squid_conf_common "$d"
      } >"$d/squid.conf"
      squid -k parse -f "$d/squid.conf" 2>"$d/parse.log" || die "squid config: $(tail -n 5 "$d/parse.log")"
      # -N: one process in the foreground, so $! is the PID whose RSS counts
      "${PROXY_PIN[@]}" squid -N -f "$d/squid.conf" 2>"$d/stderr.log" &
      PIDS+=($!)
      await_listen "$port" $! squid "$d/cache.log"
      add_system squid "127.0.0.1:$port" $!
      ;;

    tinyproxy)
      free_port port
      d=$TMP/tinyproxy
      install -d -o tinyproxy -g tinyproxy "$d"
      ports="$HTTP_PORT|$ECHO_PORT|$SOURCE_PORT|$TLS_PORT"
      # With FilterURLs On, plain requests are matched as http://host:port/path and
      # CONNECTs as host:port: both name the allowed host and ports.
      printf '%s\n' "^http://origin\\.test:($ports)/" "^origin\\.test:($ports)\$" >"$d/filter"
      cat >"$d/tinyproxy.conf" <<EOF
User tinyproxy
Group tinyproxy
Listen 127.0.0.1
Port $port
Timeout 600
MaxClients $((IDLE_TUNNELS + RR_CONNS + HTTP_CONNS + 100))
Allow 127.0.0.1
LogFile "$d/tinyproxy.log"
LogLevel Connect
PidFile "$d/tinyproxy.pid"
FilterType ere
FilterURLs On
FilterDefaultDeny Yes
Filter "$d/filter"
ConnectPort $HTTP_PORT
ConnectPort $ECHO_PORT
ConnectPort $SOURCE_PORT
ConnectPort $TLS_PORT
EOF
      # -d: foreground; unshare and sh exec, so $! is tinyproxy's PID
      "${PROXY_PIN[@]}" "${HOSTS_NS[@]}" tinyproxy -d -c "$d/tinyproxy.conf" >"$d/stderr.log" 2>&1 &
      PIDS+=($!)
      await_listen "$port" $! tinyproxy "$d/stderr.log"
      add_system tinyproxy "127.0.0.1:$port" $!
      ;;

    haproxy)
      free_port port
      free_port HAPROXY_ECHO
      free_port HAPROXY_SOURCE
      d=$TMP/haproxy
      install -d -o haproxy -g haproxy "$d"
      # Each connection takes two descriptors; HAProxy refuses a maxconn the limit cannot hold.
      cat >"$d/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn $(((NOFILE - 100) / 2))
    user haproxy
    group haproxy
    # one line per request (httplog) or relayed connection (tcplog) to stdout, a file here
    log stdout format raw daemon

defaults
    log global
    timeout connect 5s
    timeout client 600s
    timeout server 600s
    timeout http-keep-alive 600s

frontend forward
    mode http
    option httplog
    bind 127.0.0.1:$port
    # HAProxy answers 400 when an absolute-form request's Host differs from its authority
    acl bench_host req.hdr(host),host_only -m str origin.test
    acl bench_port req.hdr(host),port_only -m int eq $HTTP_PORT
    http-request deny deny_status 403 if METH_CONNECT
    http-request deny deny_status 403 unless bench_host bench_port
    default_backend origin_http

backend origin_http
    mode http
    http-reuse always
    server origin 127.0.0.1:$HTTP_PORT

frontend relay_echo
    mode tcp
    option tcplog
    bind 127.0.0.1:$HAPROXY_ECHO
    default_backend origin_echo

backend origin_echo
    mode tcp
    server origin 127.0.0.1:$ECHO_PORT

frontend relay_source
    mode tcp
    option tcplog
    bind 127.0.0.1:$HAPROXY_SOURCE
    default_backend origin_source

backend origin_source
    mode tcp
    server origin 127.0.0.1:$SOURCE_PORT
EOF
      "$HAPROXY" -c -q -f "$d/haproxy.cfg" >"$d/check.log" 2>&1 || die "haproxy config: $(tail -n 5 "$d/check.log")"
      # -db: foreground, no master process, so $! is the one process that does the work
      "${PROXY_PIN[@]}" "$HAPROXY" -db -f "$d/haproxy.cfg" >"$d/haproxy.log" 2>"$d/stderr.log" &
      PIDS+=($!)
      await_listen "$port" $! haproxy "$d/stderr.log"
      await_listen "$HAPROXY_SOURCE" $! haproxy "$d/stderr.log"
      add_system haproxy "127.0.0.1:$port" $!
      ;;

    egress) start_egress egress match-if-tls ;;
    egress-sni-off) start_egress egress-sni-off off ;;
    egress-inspect) start_egress egress-inspect inspect ;;
    squid-bump) start_squid_bump ;;
  esac
done
((${#NAMES[@]})) || die "no systems to measure"

# --- allowlist probe: each proxy passes what it should and refuses the rest ------------------
# status ADDR FIELD URL [CURL_ARGS...]: what curl saw through the proxy at ADDR
status() { curl -s -o /dev/null -m 5 -x "http://$1" -w "%{$2}" "${@:4}" "$3" || true; }
PROBES=()
for i in "${!NAMES[@]}"; do
  addr=${ADDRS[$i]}
  [[ $addr == direct ]] && continue
  got="$(status "$addr" http_code "http://origin.test:$HTTP_PORT/small")"
  got+=" $(status "$addr" http_code "http://denied.test:$HTTP_PORT/small")"
  got+=" $(status "$addr" http_code "http://origin.test:9/")"
  got+=" $(status "$addr" http_connect "http://origin.test:$HTTP_PORT/small" -p)"
  got+=" $(status "$addr" http_connect "http://origin.test:9/" -p)"
  verdict=ok
  if [[ ${NAMES[$i]} == squid-bump && $got == "200 403 403 200 200" ]]; then
    # Squid bumps a refused CONNECT to tell the client inside TLS (access.log: TCP_DENIED/200)
    verdict="ok: the refused CONNECT is bumped, its 403 inside TLS"
  fi
  if [[ ${NAMES[$i]} == haproxy && $got == "200 403 403 403 403" ]]; then
    verdict="ok: HAProxy has no CONNECT (refused); the connect-* rows use its TCP relays"
  fi
  [[ $got == "200 403 403 200 403" || $verdict != ok ]] || verdict=UNEXPECTED
  PROBES+=("${NAMES[$i]}: $got ($verdict)")
  log "allowlist ${NAMES[$i]}: GET allowed, GET other host, GET other port, CONNECT allowed, CONNECT other port = $got (want 200 403 403 200 403: $verdict)"
  if [[ ,$SCENARIOS, =~ ,(tls-rate|inspect-rate|inspect-rr), ]]; then
    got=$(tls_probe "$addr" "${CAS[$i]}")
    PROBES+=("${NAMES[$i]}: TLS GET through it, trusting $(basename "$(dirname "${CAS[$i]}")")/$(basename "${CAS[$i]}") only: $got (want 200)")
    log "TLS ${NAMES[$i]}: GET https://origin.test:$TLS_PORT/small trusting only ${CAS[$i]} = $got (want 200)"
  fi
done

# --- the runs --------------------------------------------------------------------------------
HZ=$(getconf CLK_TCK)
# tree_ticks PID: the CPU clock ticks "USER SYSTEM" of PID, of its live descendants and of the
# children they reaped (/proc/*/stat fields 14-17), so the helpers a proxy forks count too
tree_ticks() {
  python3 - "$1" <<'PY'
import os, sys
root, procs, children = int(sys.argv[1]), {}, {}
for p in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{p}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except OSError:
        continue
    # rest[0] is field 3 (state), so field n is rest[n - 3]
    utime, stime, cutime, cstime = map(int, rest[11:15])
    procs[int(p)] = (utime + cutime, stime + cstime)
    children.setdefault(int(rest[1]), []).append(int(p))
user = system = 0
todo = [root]
while todo:
    pid = todo.pop()
    u, s = procs.get(pid, (0, 0))
    user, system = user + u, system + s
    todo += children.get(pid, [])
print(user, system)
PY
}
RESULTS=$TMP/results.jsonl
: >"$RESULTS"
summary() { # one JSON line -> a short progress line
  python3 -c 'import json,sys
d = json.loads(sys.argv[1])
keys = ("rate", "unit", "p50_us", "p99_us", "gbit_s", "alive", "bytes_per_tunnel", "proxy_cpu_us_per_op", "errors",
        "first_error")
print(d["scenario"], "/", d["label"] + ":", " ".join(f"{k}={d[k]}" for k in keys if d.get(k) is not None))' "$1"
}
for sc in ${SCENARIOS//,/ }; do
  lsc=$sc # the load generator's scenario
  case $sc in
    http-forward) port=$HTTP_PORT conns=$HTTP_CONNS ;;
    connect-rr) port=$ECHO_PORT conns=$RR_CONNS ;;
    connect-bulk) port=$SOURCE_PORT conns=$BULK_CONNS ;;
    connect-rate) port=$ECHO_PORT conns=$RATE_CONNS ;;
    idle-tunnels) port=$ECHO_PORT conns=$IDLE_TUNNELS ;;
    tls-rate | inspect-rate) port=$TLS_PORT conns=$RATE_CONNS lsc=tls-rate ;;
    inspect-rr) port=$TLS_PORT conns=$RR_CONNS lsc=tls-rr ;;
  esac
  for i in "${!NAMES[@]}"; do
    name=${NAMES[$i]} addr=${ADDRS[$i]} pid=${SPIDS[$i]}
    applies "$sc" "$name" || continue
    if [[ $addr == direct ]]; then
      args=(--proxy direct --target "127.0.0.1:$port")
    elif [[ $name == haproxy && $sc == connect-* ]]; then
      # no CONNECT: straight to the TCP relay in front of the origin, as if it were direct
      relay=$HAPROXY_ECHO
      [[ $sc == connect-bulk ]] && relay=$HAPROXY_SOURCE
      args=(--proxy direct --target "127.0.0.1:$relay")
    else
      args=(--proxy "$addr" --target "origin.test:$port")
    fi
    args+=(--scenario "$lsc" --conns "$conns" --duration "$DURATION" --label "$name" --json)
    [[ $sc == idle-tunnels && -n $pid ]] && args+=(--pid "$pid")
    [[ $lsc == tls-* ]] && args+=(--ca "${CAS[$i]}")
    if [[ -n $pid ]] && ! alive "$pid"; then
      echo "{\"scenario\":\"$sc\",\"label\":\"$name\",\"failed\":\"the proxy process is gone\"}" >>"$RESULTS"
      log "$sc / $name: skipped, the proxy process is gone"
      continue
    fi
    ticks=""
    [[ -n $pid && $sc != idle-tunnels ]] && ticks=$(tree_ticks "$pid")
    # the load generator bounds its runs itself; timeout is the safety net
    if out=$(timeout "$(awk -v d="$DURATION" 'BEGIN { printf "%d", d * 3 + 60 }')" \
      "${CLIENT_PIN[@]}" "$LOADGEN" run "${args[@]}" 2>>"$TMP/loadgen.log"); then
      out=${out/\"scenario\":\"$lsc\"/\"scenario\":\"$sc\"}
      if [[ -n $ticks ]]; then # the proxy's CPU per operation (connect-bulk: per 64 KiB)
        out=$(python3 -c 'import json, sys
d = json.loads(sys.argv[1])
(u0, s0), (u1, s1) = (map(int, t.split()) for t in sys.argv[2:4])
hz = int(sys.argv[4])
d["proxy_cpu_s"] = round((u1 - u0 + s1 - s0) / hz, 3)
d["proxy_sys_s"] = round((s1 - s0) / hz, 3)
ops = d.get("bytes", 0) / 65536 if d["scenario"] == "connect-bulk" else d.get("ok")
if ops:
    d["proxy_cpu_us_per_op"] = round(1e6 * d["proxy_cpu_s"] / ops, 2)
print(json.dumps(d))' "$out" "$ticks" "$(tree_ticks "$pid")" "$HZ")
      fi
      echo "$out" >>"$RESULTS"
      log "$(summary "$out")"
    else
      why=$(tail -n 1 "$TMP/loadgen.log" | tr -d '"'"\\\\")
      echo "{\"scenario\":\"$sc\",\"label\":\"$name\",\"failed\":\"${why:-timed out}\"}" >>"$RESULTS"
      log "$sc / $name: FAILED: ${why:-timed out}"
    fi
    sleep 1 # let closed connections settle between runs
    if [[ $lsc == tls-* ]]; then # the origin reports them every second
      log "the TLS origin so far: $(grep -o '[0-9]* full, [0-9]* resumed' "$TMP/origins.log" | tail -n 1)"
    fi
  done
done

# --- what the proxies logged, as evidence that the traffic went through them ------------------
if [[ -f $TMP/squid/access.log ]]; then
  log "squid access.log result codes: $(awk '{print $4}' "$TMP/squid/access.log" | sort | uniq -c | awk '{printf "%s=%s ", $2, $1}')"
fi
if [[ -f $TMP/tinyproxy/tinyproxy.log ]]; then
  log "tinyproxy requests logged: $(grep -o 'Request (file descriptor [0-9]*): [A-Z]*' "$TMP/tinyproxy/tinyproxy.log" |
    awk '{print $NF}' | sort | uniq -c | awk '{printf "%s=%s ", $2, $1}')"
fi
if [[ -f $TMP/haproxy/haproxy.log ]]; then
  # httplog: client [date] frontend backend/server timers status ...; tcplog: no status
  log "haproxy log lines: $(awk '{print ($3 == "forward" ? $3 "/" $6 : $3)}' "$TMP/haproxy/haproxy.log" |
    sort | uniq -c | awk '{printf "%s=%s ", $2, $1}')"
fi
for name in egress egress-sni-off egress-inspect; do
  [[ -f $TMP/$name/audit.log ]] && log "$name audit records: $(wc -l <"$TMP/$name/audit.log")"
done
if [[ -f $TMP/squid-bump/access.log ]]; then
  log "squid-bump access.log result codes: $(awk '{print $4}' "$TMP/squid-bump/access.log" | sort | uniq -c | awk '{printf "%s=%s ", $2, $1}')"
fi

stop_all

# --- the table -------------------------------------------------------------------------------
if ((PIN)); then
  pinning="proxies pinned to CPU $PROXY_CPUS, load generator and origins to CPU $CLIENT_CPUS"
else
  pinning="no CPU pinning"
fi
conns_note="http-forward $HTTP_CONNS, connect-rr $RR_CONNS, connect-bulk $BULK_CONNS, connect-rate $RATE_CONNS, idle-tunnels $IDLE_TUNNELS"
[[ ,$SCENARIOS, =~ ,(tls-rate|inspect-rate|inspect-rr), ]] &&
  conns_note+="; tls-rate and inspect-rate $RATE_CONNS, inspect-rr $RR_CONNS; the TLS origin sends $ORIGIN_TICKETS session tickets per handshake"
python3 - "$RESULTS" "${SYSTEMS}" "$SCENARIOS" "$DURATION" "$pinning" "$conns_note" \
  "${PROBES[@]}" <<'PY'
import json, sys

path, systems, scenarios, duration, pinning, conns = sys.argv[1:7]
probes = sys.argv[7:]
systems, scenarios = systems.split(","), scenarios.split(",")
runs = {}
for line in open(path):
    d = json.loads(line)
    runs[(d["scenario"], d["label"])] = d

def rate(v): return f"{v / 1000:.1f}k/s" if v >= 10000 else f"{v:.0f}/s"
def us(v): return f"{v / 1000:.1f} ms" if v >= 10000 else (f"{v:.0f} µs" if v >= 100 else f"{v:.1f} µs")
def gbit(v): return f"{v:.2f} Gbit/s"
def size(v): return f"{v / 1024:.1f} KiB" if v >= 10240 else f"{v:.0f} B"

rows = [
    ("http-forward", "rate", rate, "http-forward, requests/s"),
    ("http-forward", "p50_us", us, "http-forward, p50 latency"),
    ("http-forward", "p99_us", us, "http-forward, p99 latency"),
    ("http-forward", "proxy_cpu_us_per_op", us, "http-forward, proxy CPU per request"),
    ("connect-rr", "rate", rate, "connect-rr, round trips/s"),
    ("connect-rr", "p50_us", us, "connect-rr, p50 latency"),
    ("connect-rr", "p99_us", us, "connect-rr, p99 latency"),
    ("connect-rr", "proxy_cpu_us_per_op", us, "connect-rr, proxy CPU per round trip"),
    ("connect-bulk", "gbit_s", gbit, "connect-bulk, throughput"),
    ("connect-bulk", "proxy_cpu_us_per_op", us, "connect-bulk, proxy CPU per 64 KiB"),
    ("connect-rate", "rate", rate, "connect-rate, tunnels/s"),
    ("connect-rate", "p99_us", us, "connect-rate, p99 latency"),
    ("connect-rate", "proxy_cpu_us_per_op", us, "connect-rate, proxy CPU per tunnel"),
    ("idle-tunnels", "bytes_per_tunnel", size, "idle-tunnels, proxy RSS per tunnel"),
    ("tls-rate", "rate", rate, "tls-rate, tunnels/s"),
    ("tls-rate", "p99_us", us, "tls-rate, p99 latency"),
    ("tls-rate", "proxy_cpu_us_per_op", us, "tls-rate, proxy CPU per tunnel"),
    ("inspect-rate", "rate", rate, "inspect-rate, tunnels/s"),
    ("inspect-rate", "p99_us", us, "inspect-rate, p99 latency"),
    ("inspect-rate", "proxy_cpu_us_per_op", us, "inspect-rate, proxy CPU per tunnel"),
    ("inspect-rr", "rate", rate, "inspect-rr, requests/s"),
    ("inspect-rr", "p50_us", us, "inspect-rr, p50 latency"),
    ("inspect-rr", "proxy_cpu_us_per_op", us, "inspect-rr, proxy CPU per request"),
]
print("| scenario, metric | " + " | ".join(systems) + " |")
print("|---|" + "---|" * len(systems))
for sc, key, fmt, label in rows:
    if sc not in scenarios:
        continue
    base = runs.get((sc, "direct"), {}).get(key)
    cells = []
    for name in systems:
        d = runs.get((sc, name))
        if d is None:
            cells.append("—")
            continue
        if "failed" in d:
            cells.append("FAILED")
            continue
        v = d.get(key)
        cell = "—" if v is None else fmt(v)
        if v is not None and base and name != "direct":
            cell += f" ({v / base:.2f}×)"
        if key == "proxy_cpu_us_per_op" and v is not None and d.get("proxy_cpu_s"):
            cell += f", {100 * d['proxy_sys_s'] / d['proxy_cpu_s']:.0f} % sys"
        if sc == "idle-tunnels":
            cell += f" [{d.get('alive', 0)}/{d.get('conns')} alive]"
        if d.get("errors"):
            cell += f" ⚠ {d['errors']} errors"
        cells.append(cell)
    print(f"| {label} | " + " | ".join(cells) + " |")
print()
print(f"Ratios are system ÷ direct from this run (throughput: higher is better; latency: lower is "
      f"better). {duration} s per run; connections: {conns}; {pinning}.")
for d in runs.values():
    if "failed" in d:
        print(f"- {d['label']} / {d['scenario']}: FAILED: {d['failed']}")
    elif d.get("errors"):
        print(f"- {d['label']} / {d['scenario']}: {d['errors']} errors, the first: {d.get('first_error')}")
    if d.get("scenario") == "http-forward" and d.get("ok") and d.get("connects", 0) > 2 * d["conns"]:
        print(f"- {d['label']} / http-forward: {d['connects']} client connections for {d['ok']} requests "
              "(the proxy closed keep-alive connections)")
def versus(sc, a, b, what):
    x, y = runs.get((sc, a), {}).get("rate"), runs.get((sc, b), {}).get("rate")
    if x and y:
        print(f"- {sc}: {a} ÷ {b} = {x / y:.2f}× ({what})")
if any("proxy_cpu_us_per_op" in d for d in runs.values()):
    print("- proxy CPU: user + system CPU time of the system's processes (with Squid's certificate helpers), "
          "from the load generator's start to its end, per operation it counted (in-flight ones are not), "
          "and the share of it in the kernel")
if "haproxy" in systems:
    print("- haproxy: http-forward through a `mode http` frontend (Host and port ACLs, keep-alive to the origin, "
          "`http-reuse always`, one thread); HAProxy has no CONNECT, so its connect-* cells are `mode tcp` "
          "frontends relaying each connection straight to the origin: the least a proxy can do per round trip "
          "(no CONNECT, no request parsing, no per-tunnel policy), a floor rather than a peer")
versus("tls-rate", "egress", "egress-sni-off", "the SNI peek's cost: 1 − this")
versus("inspect-rate", "egress-inspect", "squid-bump", "new inspected tunnels against Squid's ssl_bump")
versus("inspect-rr", "egress-inspect", "squid-bump", "requests on kept-alive inspected tunnels against Squid's ssl_bump")
for p in probes:
    if "TLS GET" in p:
        print(f"- probe {p}")
        continue
    print(f"- allowlist probe {p}: GET allowed, GET other host, GET other port, CONNECT allowed, "
          "CONNECT other port (want 200 403 403 200 403)")
PY
