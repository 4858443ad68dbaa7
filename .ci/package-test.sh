#!/usr/bin/env bash
# The Debian package, end to end (README "Install from the package"):
# build it with cargo-deb, install it with dpkg, check what it installed
# (files, conffiles, the system user, the log folder, the systemd unit, the
# configuration), run the installed binary as the packaged user on the
# packaged configuration, send one allowed and one refused request through
# it, and find both records in /var/log/egress-proxy/audit.log. Then remove
# and purge the package.
#
# Needs root (dpkg -i, the system user). `.ci/run` calls it after the tests.
#   KEEP_INSTALLED=1   leave the package installed at the end
#   DEB=path.deb       test that package instead of building one
# `cargo deb` builds with the release profile (fat LTO, one codegen unit:
# minutes on 2 cores). For a quick local iteration only:
#   CARGO_PROFILE_RELEASE_LTO=thin CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 .ci/package-test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

phase_start=$SECONDS
phase() {
  echo "   ($((SECONDS - phase_start)) s)"
  phase_start=$SECONDS
  echo "== package: $*"
}
fail() {
  echo "package test FAILED: $*" >&2
  exit 1
}

echo "== package: tools"
need=()
command -v dpkg-shlibdeps >/dev/null || need+=(dpkg-dev)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v curl >/dev/null || need+=(curl)
command -v adduser >/dev/null || need+=(adduser)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ -z "${DEB:-}" ] && ! command -v cargo-deb >/dev/null; then
  cargo install --locked cargo-deb
fi

if [ -z "${DEB:-}" ]; then
  phase "build (release profile), man page and completions, cargo deb --no-build"
  cargo build --release --locked
  assets=target/assets
  target/release/egress-proxy generate man --out "$assets"
  for shell in bash zsh fish; do
    target/release/egress-proxy generate completions "$shell" --out "$assets"
  done
  # cargo-deb prints the package's path last on standard output.
  DEB=$(cargo deb --locked --no-build | tail -n 1)
fi
[ -f "$DEB" ] || fail "no package at '$DEB'"
echo "package: $DEB"

phase "contents"
dpkg-deb --info "$DEB"
contents=$(dpkg-deb --contents "$DEB")
echo "$contents"
for f in ./usr/bin/egress-proxy ./etc/egress-proxy/egress-proxy.toml \
  ./etc/egress-proxy/catalog.toml ./etc/logrotate.d/egress-proxy \
  ./usr/lib/systemd/system/egress-proxy.service \
  ./usr/share/bash-completion/completions/egress-proxy \
  ./usr/share/zsh/vendor-completions/_egress-proxy \
  ./usr/share/fish/vendor_completions.d/egress-proxy.fish; do
  grep -q " $f\$" <<<"$contents" || fail "$f is not in the package"
done
# cargo-deb may gzip the man page.
grep -qE ' \./usr/share/man/man1/egress-proxy\.1(\.gz)?$' <<<"$contents" ||
  fail "the man page is not in the package"
conffiles=$(dpkg-deb --ctrl-tarfile "$DEB" | tar -xO ./conffiles)
for f in /etc/egress-proxy/egress-proxy.toml /etc/egress-proxy/catalog.toml /etc/logrotate.d/egress-proxy; do
  grep -qx "$f" <<<"$conffiles" || fail "$f is not a conffile"
done

phase "install (dpkg -i)"
dpkg -i "$DEB"
getent passwd egress-proxy >/dev/null || fail "no system user egress-proxy"
[ "$(stat -c '%U:%G %a' /var/log/egress-proxy)" = "egress-proxy:egress-proxy 750" ] ||
  fail "/var/log/egress-proxy is $(stat -c '%U:%G %a' /var/log/egress-proxy)"
grep -qx 'path = "/var/log/egress-proxy/audit.log"' /etc/egress-proxy/egress-proxy.toml ||
  fail "the packaged configuration does not write /var/log/egress-proxy/audit.log"
/usr/bin/egress-proxy --version | grep -E '^egress-proxy [0-9.]+ \(commit ([0-9a-f]{12}|unknown)\)$' ||
  fail "--version does not name the version and the commit"
page=$(dpkg -L egress-proxy | grep -E '/man1/egress-proxy\.1(\.gz)?$')
if command -v man >/dev/null; then
  man -l "$page" 2>/dev/null | grep -q 'egress-proxy' || fail "man -l $page shows nothing"
fi

phase "configuration discovery (no --config, from /: the packaged one)"
used=$(cd / && env -u EGRESS_PROXY_CONFIG /usr/bin/egress-proxy check 2>&1 >/dev/null)
grep -qx 'egress-proxy: configuration /etc/egress-proxy/egress-proxy.toml, catalog /etc/egress-proxy/catalog.toml' <<<"$used" ||
  fail "check without --config does not use /etc/egress-proxy/egress-proxy.toml: $used"

phase "systemd unit (systemd-analyze verify)"
unit=$(dpkg -L egress-proxy | grep -E '/systemd/system/egress-proxy\.service$')
grep -qx 'ExecStart=/usr/bin/egress-proxy run --config /etc/egress-proxy/egress-proxy.toml' "$unit" ||
  fail "$unit does not start /usr/bin/egress-proxy with the packaged configuration"
grep -qx 'User=egress-proxy' "$unit" || fail "$unit does not run as egress-proxy"
verify() {
  # verify exits 0 on unknown keys but says so: any word about the unit
  # fails (warnings about not running under systemd as PID 1 do not).
  local out rc=0
  out=$(SYSTEMD_LOG_LEVEL=warning systemd-analyze verify "$1" 2>&1) || rc=$?
  echo "$out" | grep -E "$(basename "$1")|Unknown|ignoring|No such file|not executable" && return 1
  return "$rc"
}
grep -qx 'Type=notify' "$unit" || fail "$unit is not Type=notify"
grep -qx 'ExecReload=/bin/kill -HUP $MAINPID' "$unit" || fail "$unit does not reload with SIGHUP"
unit_checked=$unit
verify "$unit_checked" || fail "systemd-analyze verify $unit_checked"
# The check can fail: the same unit with a missing binary must be refused.
broken=$(mktemp -d)
sed 's#^ExecStart=/usr/bin/egress-proxy #ExecStart=/usr/bin/egress-proxy-missing #' "$unit_checked" >"$broken/egress-proxy.service"
if verify "$broken/egress-proxy.service" >/dev/null; then
  fail "systemd-analyze verify accepts a unit whose binary is missing: the check above proves nothing"
fi
sed 's#^User=egress-proxy$#User=egress-proxy\nNoSuchKey=yes#' "$unit_checked" >"$broken/egress-proxy.service"
if verify "$broken/egress-proxy.service" >/dev/null; then
  fail "systemd-analyze verify accepts a unit with an unknown key: the check above proves nothing"
fi
rm -rf "$broken"
if command -v logrotate >/dev/null; then
  logrotate --debug /etc/logrotate.d/egress-proxy 2>&1 | grep '/var/log/egress-proxy/\*\.log' >/dev/null ||
    fail "logrotate does not read /etc/logrotate.d/egress-proxy"
fi

phase "configuration (egress-proxy check, as root and as egress-proxy)"
/usr/bin/egress-proxy check --config /etc/egress-proxy/egress-proxy.toml
setpriv --reuid=egress-proxy --regid=egress-proxy --clear-groups \
  /usr/bin/egress-proxy check --config /etc/egress-proxy/egress-proxy.toml >/dev/null

phase "run the installed binary as egress-proxy"
free_port() {
  local p
  for _ in $(seq 50); do
    p=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "$p"
      return
    fi
  done
  fail "no free port"
}
proxy_port=$(free_port)
admin_port=$(free_port)
[ "$proxy_port" != "$admin_port" ] || admin_port=$(free_port)
work=$(mktemp -d)
chmod 755 "$work"
# The packaged configuration, unchanged, with the environment overriding the
# listen addresses and one more thing: the vendor catalog admits only vendor
# hosts, which cannot be reached from here, so the allowed request goes to
# the proxy's own admin listener (/healthz) through a catalog that is the
# packaged one plus a rule for that address (and loopback allowed for it).
{
  cat /etc/egress-proxy/catalog.toml
  printf '\n[[rule]]\nname = "package test: the admin listener"\naddresses = ["127.0.0.1/32"]\nports = [%s]\naction = "allow"\n' "$admin_port"
} >"$work/catalog.toml"
chmod 644 "$work/catalog.toml"
lines_before=0
if [ -e /var/log/egress-proxy/audit.log ]; then
  lines_before=$(wc -l </var/log/egress-proxy/audit.log)
fi
env EGRESS_PROXY__SERVER__LISTEN="127.0.0.1:$proxy_port" \
  EGRESS_PROXY__SERVER__ADMIN_LISTEN="127.0.0.1:$admin_port" \
  EGRESS_PROXY__POLICY__CATALOG="$work/catalog.toml" \
  EGRESS_PROXY__DNS__ALLOW_PRIVATE=127.0.0.1/32 \
  setpriv --reuid=egress-proxy --regid=egress-proxy --clear-groups \
  /usr/bin/egress-proxy run --config /etc/egress-proxy/egress-proxy.toml 2>"$work/log" &
pid=$!
status=
stop() {
  kill -TERM "$pid" 2>/dev/null || true
  status=0
  wait "$pid" 2>/dev/null || status=$?
}
trap 'stop; cat "$work/log" >&2' EXIT
ready=
for _ in $(seq 100); do
  if curl -fsS -o /dev/null "http://127.0.0.1:$admin_port/readyz" 2>/dev/null; then
    ready=1
    break
  fi
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.1
done
[ -n "$ready" ] || fail "the proxy did not become ready"
[ "$(ps -o user= -p "$pid")" = "egress-proxy" ] || fail "the proxy does not run as egress-proxy"

allowed_url="http://127.0.0.1:$admin_port/healthz"
code=$(curl -sS -o "$work/allowed" -w '%{http_code}' -x "http://127.0.0.1:$proxy_port" "$allowed_url")
if [ "$code" != 200 ] || [ "$(cat "$work/allowed")" != ok ]; then
  fail "allowed request: $code $(cat "$work/allowed")"
fi
code=$(curl -sS -o "$work/refused" -D "$work/refused.head" -w '%{http_code}' \
  -x "http://127.0.0.1:$proxy_port" http://example.com/)
[ "$code" = 403 ] || fail "refused request: $code"
grep -qi '^x-egress-error: not_in_catalog' "$work/refused.head" || fail "no X-Egress-Error: not_in_catalog"
id=$(grep -o '[0-9a-f]\{16\}' "$work/refused" | head -n 1)
[ -n "$id" ] || fail "no record id in the refusal body: $(cat "$work/refused")"

stop
trap - EXIT
echo "proxy log:"
cat "$work/log"
[ "$status" = 0 ] || fail "the proxy exited $status on SIGTERM"

phase "records in /var/log/egress-proxy/audit.log"
log=/var/log/egress-proxy/audit.log
[ "$(stat -c %U "$log")" = egress-proxy ] || fail "$log is owned by $(stat -c %U "$log")"
new=$(tail -n "+$((lines_before + 1))" "$log")
echo "$new"
grep -F "\"url\":\"$allowed_url\"" <<<"$new" | grep -F '"decision":"allow"' |
  grep -F '"rule":"package test: the admin listener"' | grep -F '"status":200' >/dev/null ||
  fail "no allow record for $allowed_url"
grep -F "\"id\":\"$id\"" <<<"$new" | grep -F '"decision":"deny"' |
  grep -F '"reason":"not_in_catalog"' | grep -F '"status":403' >/dev/null ||
  fail "no deny record with id $id"
rm -rf "$work"

if [ -z "${KEEP_INSTALLED:-}" ]; then
  phase "remove and purge"
  dpkg --remove egress-proxy
  [ ! -e /usr/bin/egress-proxy ] || fail "/usr/bin/egress-proxy is still there after remove"
  [ -e /etc/egress-proxy/egress-proxy.toml ] || fail "remove must keep the conffiles"
  dpkg --purge egress-proxy
  [ ! -e /etc/egress-proxy/egress-proxy.toml ] || fail "purge must delete the conffiles"
fi
echo "   ($((SECONDS - phase_start)) s)"
echo "== package: OK"
