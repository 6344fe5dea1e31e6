#!/usr/bin/env bash
# Check contactd's packaging: systemd units, sysusers.d and tmpfiles.d files,
# maintainer scripts.
#
#   packaging/check-units.sh [PATH/TO/contactd]
#   packaging/check-units.sh --exposure UNIT_FILE   (prints its offline score)
#
# 1. `systemd-analyze verify` on both units. verify insists that ExecStart=
#    binaries exist, so it checks copies whose /usr/bin/contactd is replaced by
#    the binary given as argument (default: target/debug/contactd, or a stub if
#    that is not built). systemd 252 only *warns* about unknown keys and
#    unparsable values ("Unknown key ...", "Failed to parse ..., ignoring") and
#    still exits 0, so any diagnostic that names one of our units is an error.
# 2. `systemd-analyze security --offline=true` on both units: fails if the
#    server's overall exposure level is above 2.0 or the agent's above 2.5.
# 3. The sysusers.d and tmpfiles.d files are applied to a scratch root, the
#    maintainer scripts are parsed by sh -n, and every packaging shell script
#    is checked by shellcheck if it is installed. (packaging/test-in-systemd.sh
#    installs the package under a real systemd and compares the online score
#    with the offline one printed by --exposure.)
#
# Installs systemd (for systemd-analyze, systemd-sysusers, systemd-tmpfiles)
# with apt-get if it is missing. Needs no running systemd.
set -euo pipefail

cd "$(dirname "$0")/.."
export LC_ALL=C SYSTEMD_COLORS=0 SYSTEMD_PAGER=cat

readonly SERVER_UNIT=packaging/systemd/contactd.service
readonly AGENT_UNIT=packaging/systemd/contactd-agent.service
readonly SOCKET_UNIT=packaging/systemd/contactd.socket
readonly SERVER_MAX=2.0
readonly AGENT_MAX=2.5

failures=0
fail() {
    echo "check-units: FAIL: $*" >&2
    failures=$((failures + 1))
}

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "check-units: systemd-analyze not found; installing systemd"
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then sudo=(sudo); fi
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends systemd >/dev/null
fi

# Prints the overall exposure level of a unit file (e.g. "1.1"), or nothing.
exposure_level() {
    systemd-analyze security --offline=true --no-pager "$1" 2>&1 |
        sed -nE 's/.*Overall exposure level for .*: *([0-9]+(\.[0-9]+)?)( .*)?$/\1/p' |
        tail -n 1
}
if [ "${1:-}" = --exposure ]; then
    exposure_level "${2:?--exposure needs a unit file}"
    exit 0
fi
echo "check-units: $(systemd-analyze --version | head -n 1)"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# --- 1. verify ----------------------------------------------------------------
binary=${1:-target/debug/contactd}
if [ -x "$binary" ]; then
    binary=$(cd "$(dirname "$binary")" && pwd)/$(basename "$binary")
elif [ $# -ge 1 ]; then
    echo "check-units: $binary: not an executable file" >&2
    exit 2
else
    echo "check-units: $binary is not built; verifying against a stub binary"
    binary=$scratch/bin/contactd
    mkdir -p "$scratch/bin"
    printf '#!/bin/sh\nexit 0\n' >"$binary"
    chmod +x "$binary"
fi

mkdir -p "$scratch/units"
for unit in "$SERVER_UNIT" "$AGENT_UNIT" "$SOCKET_UNIT"; do
    sed "s#/usr/bin/contactd#${binary}#g" "$unit" >"$scratch/units/$(basename "$unit")"
done

verify_out=$scratch/verify.out
verify_rc=0
systemd-analyze verify --man=no "$scratch"/units/*.service "$scratch"/units/*.socket >"$verify_out" 2>&1 || verify_rc=$?
# Diagnostics about our units name the unit ("contactd.service: ...") or its
# file ("/tmp/.../contactd.service:40: ..."); others (about distribution units
# pulled in as dependencies) are shown but do not fail the check.
ours=$(grep -E '(^|/)contactd(-agent)?\.(service|socket)(:|$)' "$verify_out" || true)
if [ "$verify_rc" -ne 0 ] || [ -n "$ours" ]; then
    fail "systemd-analyze verify (exit $verify_rc) reported problems in the units (line numbers are those of packaging/systemd/*):"
    sed "s#$scratch/units/#packaging/systemd/#g" "$verify_out" >&2
else
    if [ -s "$verify_out" ]; then
        echo "check-units: verify notes about other units (ignored):"
        sed 's/^/    /' "$verify_out"
    fi
    echo "check-units: systemd-analyze verify: the three units OK"
fi

# --- 2. security --------------------------------------------------------------
check_exposure() {
    local unit=$1 max=$2 level
    level=$(exposure_level "$unit")
    if [ -z "$level" ]; then
        fail "$unit: no \"Overall exposure level\" line in the output of systemd-analyze security:"
        systemd-analyze security --offline=true --no-pager "$unit" >&2 || true
        return
    fi
    if awk -v l="$level" -v m="$max" 'BEGIN { exit !(l > m) }'; then
        fail "$unit: exposure level $level is above the allowed $max; see: systemd-analyze security --offline=true $unit"
    else
        echo "check-units: $unit: exposure level $level (at most $max) OK"
    fi
}
check_exposure "$SERVER_UNIT" "$SERVER_MAX"
check_exposure "$AGENT_UNIT" "$AGENT_MAX"

# --- 3. sysusers.d, tmpfiles.d, maintainer scripts ----------------------------
root=$scratch/root
mkdir -p "$root/etc" "$root/usr/lib/sysusers.d" "$root/usr/lib/tmpfiles.d"
touch "$root/etc/passwd" "$root/etc/group" "$root/etc/shadow" "$root/etc/gshadow"
cp packaging/sysusers.d/contactd.conf "$root/usr/lib/sysusers.d/"
cp packaging/tmpfiles.d/contactd.conf "$root/usr/lib/tmpfiles.d/"
if ! out=$(systemd-sysusers --root="$root" contactd.conf 2>&1) ||
    ! grep -q '^contactd:' "$root/etc/passwd" || ! grep -q '^contactd:' "$root/etc/group"; then
    fail "packaging/sysusers.d/contactd.conf does not create user and group contactd: $out"
elif ! out=$(systemd-tmpfiles --root="$root" --create contactd.conf 2>&1) ||
    [ "$(stat -c %a "$root/var/log/contactd" 2>/dev/null)" != 750 ]; then
    fail "packaging/tmpfiles.d/contactd.conf does not create /var/log/contactd 0750: $out"
else
    echo "check-units: sysusers.d and tmpfiles.d files OK"
fi
for script in packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm; do
    if ! sh -n "$script"; then
        fail "$script: shell syntax error"
    elif [ ! -x "$script" ]; then
        fail "$script: not executable"
    fi
done
if command -v shellcheck >/dev/null 2>&1; then
    if shellcheck packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm \
        packaging/*.sh .ci/run; then
        echo "check-units: shellcheck: maintainer and packaging scripts OK"
    else
        fail "shellcheck found problems (above)"
    fi
else
    echo "check-units: shellcheck not installed: maintainer scripts only checked by sh -n"
fi

if [ "$failures" -ne 0 ]; then
    echo "check-units: $failures check(s) failed" >&2
    exit 1
fi
echo "check-units: all packaging checks passed"
