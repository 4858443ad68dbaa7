# shellcheck shell=bash
# Sourced by benches/compare.sh: the egress-proxy systems (egress, egress-sni-off,
# egress-inspect), Squid's OpenSSL build with ssl_bump (squid-bump), and which
# scenario applies to which system. The functions use compare.sh's globals and
# helpers (TMP, PIDS, PROXY_PIN, free_port, await_listen, add_system, die, log).

# applies SCENARIO SYSTEM: whether the scenario is run against the system. The
# inspecting systems take only the inspect scenarios, which take nothing else;
# haproxy (no CONNECT) takes http-forward and, through its TCP relays, the
# connect-* scenarios but neither idle-tunnels nor the TLS ones.
applies() {
  case $1 in
    inspect-*) listed "$2" direct,egress-inspect,squid-bump ;;
    idle-tunnels | tls-*) ! listed "$2" egress-inspect,squid-bump,haproxy ;;
    *) ! listed "$2" egress-inspect,squid-bump ;;
  esac
}

# start_egress NAME MODE: egress-proxy with the bench catalog. MODE match-if-tls:
# the TLS origin's port is in the bypass rule with the default SNI check (the
# proxy peeks at the ClientHello); off: the same rule with sni = "off"; inspect:
# a [tls] CA of its own and an allow rule for the TLS origin's port, so those
# tunnels are inspected (the origin's CA in extra_roots).
start_egress() {
  local name=$1 mode=$2 port="" admin="" d tunnel_ports sni="" tls="" inspected="" ca=""
  free_port port
  free_port admin
  d=$TMP/$name
  mkdir -p "$d"
  tunnel_ports="$ECHO_PORT, $SOURCE_PORT, $TLS_PORT"
  case $mode in
    off) sni='sni = "off"' ;;
    inspect)
      "$EGRESS_BIN" ca generate --out "$d/ca" >"$d/ca.log" 2>&1 || die "egress-proxy ca generate: $(tail -n 3 "$d/ca.log")"
      ca=$d/ca/ca.pem
      tls="[tls]
ca_cert = \"$d/ca/ca.pem\"
ca_key = \"$d/ca/ca.key\"
extra_roots = [\"$TMP/origin-ca.pem\"]"
      tunnel_ports="$ECHO_PORT, $SOURCE_PORT"
      inspected="[[rule]]
name = \"bench inspected\"
hosts = [\"origin.test\"]
ports = [$TLS_PORT]
action = \"allow\""
      ;;
  esac
  cat >"$d/egress-proxy.toml" <<EOF
[server]
listen = ["127.0.0.1:$port"]
admin_listen = "127.0.0.1:$admin"

[clients]
allow = ["127.0.0.0/8"]

[dns]
static = { "origin.test" = ["127.0.0.1"] }
allow_private = ["127.0.0.0/8"]

[policy]
catalog = "catalog.toml"
default = "deny"

[audit]
path = "$d/audit.log"

$tls
EOF
  cat >"$d/catalog.toml" <<EOF
[[rule]]
name = "bench http origin"
hosts = ["origin.test"]
ports = [$HTTP_PORT]
action = "allow"

[[rule]]
name = "bench tunnels"
hosts = ["origin.test"]
ports = [$tunnel_ports]
action = "bypass"
$sni

$inspected
EOF
  "${PROXY_PIN[@]}" "$EGRESS_BIN" run --config "$d/egress-proxy.toml" >"$d/stdout.log" 2>"$d/stderr.log" &
  PIDS+=($!)
  await_listen "$port" $! "$name" "$d/stderr.log"
  add_system "$name" "127.0.0.1:$port" $! "$ca"
}

# squid_openssl_root: Squid's OpenSSL build (Debian's squid-openssl), fetched with
# apt-get download and unpacked under CACHE_DIR, never installed: it conflicts with
# the squid package. Prints the unpacked root.
squid_openssl_root() {
  local dir=$CACHE_DIR/squid-openssl deb
  if [[ ! -x $dir/root/usr/sbin/squid || ! -x $dir/root/usr/lib/squid/security_file_certgen ]]; then
    log "fetching squid-openssl (apt-get download) into $dir"
    mkdir -p "$dir"
    (cd "$dir" && apt-get download squid-openssl >/dev/null 2>"$dir/download.log") ||
      { apt-get update -qq && (cd "$dir" && apt-get download squid-openssl >/dev/null 2>"$dir/download.log"); } ||
      die "apt-get download squid-openssl failed: $(tail -n 3 "$dir/download.log")"
    deb=$(find "$dir" -maxdepth 1 -name 'squid-openssl_*.deb' -printf '%T@ %p\n' | sort -rn | head -n 1 | cut -d' ' -f2-)
    [[ -n $deb ]] || die "no squid-openssl_*.deb in $dir"
    rm -rf "$dir/root"
    dpkg-deb -x "$deb" "$dir/root" || die "dpkg-deb -x $deb failed"
  fi
  echo "$dir/root"
}

# start_squid_bump: Squid (OpenSSL build) bumping every CONNECT with leaves from a CA of
# its own (ECDSA P-256, like egress-proxy's), minted by security_file_certgen; it trusts
# the TLS origin's CA for its side. The same allowlist as squid.
start_squid_bump() {
  local root port="" d
  root=$(squid_openssl_root)
  free_port port
  d=$TMP/squid-bump
  install -d -o proxy -g proxy "$d"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 7 \
    -subj "/CN=squid-bump bench CA" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
    -keyout "$d/ca.key" -out "$d/ca.pem" >"$d/openssl.log" 2>&1 || die "openssl req: $(tail -n 3 "$d/openssl.log")"
  # The helper runs as proxy, which may not reach CACHE_DIR (e.g. under /root): a copy here.
  install -m 755 "$root/usr/lib/squid/security_file_certgen" "$d/security_file_certgen"
  "$d/security_file_certgen" -c -s "$d/ssl_db" -M 4MB >"$d/certgen.log" 2>&1 ||
    die "security_file_certgen -c: $(tail -n 3 "$d/certgen.log")"
  chown -R proxy:proxy "$d"
  cat >"$d/squid.conf" <<EOF
http_port 127.0.0.1:$port ssl-bump tls-cert=$d/ca.pem tls-key=$d/ca.key generate-host-certificates=on dynamic_cert_mem_cache_size=16MB
sslcrtd_program $d/security_file_certgen -s $d/ssl_db -M 4MB
sslcrtd_children 4 startup=1 idle=1
ssl_bump bump all
tls_outgoing_options cafile=$TMP/origin-ca.pem
EOF
  squid_conf_common "$d" >>"$d/squid.conf"
  "$root/usr/sbin/squid" -k parse -f "$d/squid.conf" 2>"$d/parse.log" || die "squid-bump config: $(tail -n 5 "$d/parse.log")"
  # -N: one process in the foreground (its certificate helpers are its children);
  # -n: a service name of its own, so no other Squid's shared memory is in the way
  "${PROXY_PIN[@]}" "$root/usr/sbin/squid" -N -n benchbump -f "$d/squid.conf" 2>"$d/stderr.log" &
  PIDS+=($!)
  await_listen "$port" $! squid-bump "$d/cache.log"
  add_system squid-bump "127.0.0.1:$port" $! "$d/ca.pem"
}

# tls_probe ADDR CA: the status of a GET of the TLS origin through the proxy at ADDR,
# trusting only CA (for an inspecting proxy, success proves it terminated the TLS).
tls_probe() {
  curl -s -o /dev/null -m 5 -x "http://$1" --cacert "$2" -w "%{http_code}" \
    "https://origin.test:$TLS_PORT/small" || true
}
