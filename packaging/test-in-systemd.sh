#!/usr/bin/env bash
# The Debian package under a real systemd: lint the .deb, boot a Debian 12
# container whose PID 1 is systemd, install the package there and check with
# the real systemctl what the README promises.
#
#   packaging/test-in-systemd.sh --binary PATH/TO/contactd
#   packaging/test-in-systemd.sh OLD.deb NEW.deb
#   packaging/test-in-systemd.sh --prepare
#
# --prepare: only installs what is missing and builds the cached rootfs
# (steps 0 and 2 below), then exits. .ci/run starts it in the background
# while cargo builds: it is mostly downloading and unpacking, which a
# compiling machine has room for.
#
# --binary: packages that binary twice with packaging/build-deb.sh (gzip,
# for speed): as Cargo.toml's version, and with a higher version for the
# upgrade test. Otherwise the two given packages are used (NEW must have the
# higher version).
#
# Steps (see ../shared/reference/systemd-nspawn.md for why each flag is there):
# 1. lintian on the first package: no error or warning may be left
#    (explained warnings are overridden in packaging/debian/lintian-overrides,
#    shipped in the package).
# 2. A debootstrapped Debian 12 rootfs, cached in $CONTACTD_CI_CACHE
#    (default /var/cache/contactd-ci) and never changed after it is built:
#    built into a temporary directory and renamed into place, so an
#    interrupted run never leaves a broken cache.
# 3. Inside a private mount namespace, an overlay over that rootfs (so
#    nothing is mounted on the host and the cache stays unchanged) is booted
#    with `systemd-nspawn --boot --private-network` (loopback only) from a
#    cgroup this script creates; commands run inside with nsenter.
# 4. The checks, in order: install (enabled, active, both ports taken from
#    contactd.socket, STATUS=, health over TLS, the TLS files, man pages and
#    completions), reload, invalid reload, watchdog, invalid config +
#    restart, the agent with a certificate from `contactd tls issue` across a
#    server restart (a connection every 10 ms meanwhile, none refused; every
#    task acked), `systemd-analyze security` against
#    packaging/check-units.sh's offline score, upgrade (the same probe and
#    count), stop, remove, purge.
#
# Every wait is bounded and waits for an event (a unit state, a journal line,
# a process), polling every 0.1 s. Whatever happens, the EXIT traps stop the
# container, kill every process left in the cgroups this script made, remove
# the cgroups and the scratch directory (the overlay is mounted only in the
# private mount namespace, which ends with it). Needs root; installs
# systemd-container and debootstrap (--no-install-recommends) and lintian if
# they are missing.
# Functions run through wait_until and traps look unreachable to shellcheck;
# dpkg-query's ${Field} formats are meant literally.
# shellcheck disable=SC2317,SC2016
set -euo pipefail

self=$(realpath "$0")
cd "$(dirname "$self")/.."
export LC_ALL=C SYSTEMD_COLORS=0 SYSTEMD_PAGER=cat

readonly SUITE=bookworm
readonly CACHE=${CONTACTD_CI_CACHE:-/var/cache/contactd-ci}
readonly ROOTFS=$CACHE/rootfs-$SUITE
# Changing the recipe rebuilds the cached rootfs (it is stored in it).
readonly RECIPE="debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,procps $SUITE"
# The journal line systemd writes when the server's unit has started.
readonly SERVER_STARTED='Started contactd.service - contactd gRPC task server'
readonly TLS=/etc/contactd/tls
readonly AGENT=ci-agent

say() { printf 'test-in-systemd: %s\n' "$*"; }
die() {
    say "FAIL: $*" >&2
    exit 1
}
now_ns() { date +%s%N; }
# Seconds since $1 (from now_ns), with one decimal.
since() { awk -v a="$1" -v b="$(now_ns)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }'; }

# ---------------------------------------------------------------------------
# Inside the private mount namespace (the script runs itself again there).
# ---------------------------------------------------------------------------
if [ "${1:-}" = --inside ]; then
    shift
    readonly WORK=$1 NAME=$2 DEB=$3 DEB_NEW=$4 SERVER_EXPOSURE=$5 AGENT_EXPOSURE=$6
    passed=0
    nspawn_pid=
    cpid=

    ok() {
        passed=$((passed + 1))
        say "ok: $*"
    }

    # Runs a command in the container, as root, with a clean environment.
    # Bounded generously: on a loaded 2-core machine an apt-get install (with
    # its daemon-reload and start) has taken over 2 minutes.
    c() {
        timeout --kill-after=5 300 nsenter -t "$cpid" -m -u -i -n -p -C -- \
            /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C TERM=dumb HOME=/root \
            SYSTEMD_PAGER=cat SYSTEMD_COLORS=0 DEBIAN_FRONTEND=noninteractive "$@"
    }
    prop() { c systemctl show -p "$2" --value "$1"; }

    # What a failed check needs to be understood: units, journal.
    diagnose() {
        [ -n "$cpid" ] || return 0
        say "--- diagnostics: systemctl status, journal (last 80 lines)" >&2
        c systemctl status --no-pager -l contactd contactd-agent >&2 || true
        c journalctl --no-pager -n 80 >&2 || true
    }
    fail() {
        say "FAIL: $*" >&2
        diagnose
        exit 1
    }
    expect() { # DESCRIPTION EXPECTED ACTUAL
        [ "$2" = "$3" ] || fail "$1: expected '$2', got '$3'"
        ok "$1: $3"
    }

    # wait_until SECONDS DESCRIPTION COMMAND...: polls COMMAND until it succeeds.
    wait_until() {
        local limit=$1 desc=$2 start
        shift 2
        start=$(now_ns)
        until "$@" >/dev/null 2>&1; do
            if [ $(($(now_ns) - start)) -gt $((limit * 1000000000)) ]; then
                fail "timed out after ${limit}s waiting for $desc"
            fi
            sleep 0.1
        done
        ok "$desc (after $(since "$start")s)"
    }

    # Runs a package command inside; its output is shown, and it must neither
    # fail nor print a warning or an error.
    pkg() {
        local out
        out=$(c "$@" 2>&1 </dev/null) || fail "$* failed: $out"
        # (Without dpkg's progress lines, "(Reading database ... 5%" and so on.)
        printf '%s\n' "$out" | tr '\r' '\n' | grep -v '^(Reading database \.\.\. [0-9]*%$' |
            sed "s/^/    $1: /"
        if printf '%s\n' "$out" | grep -iE 'warning|error|not found|^[WE]: '; then
            fail "$* printed a warning or an error"
        fi
    }

    # Journal positions, to look only at what a step logged.
    cursor() { c journalctl -q -n 0 --show-cursor | sed -n 's/^-- cursor: //p'; }
    journal_after() { c journalctl --no-pager -q -o cat --after-cursor="$1" "${@:2}"; }
    # grep reads to the end (no -q): with pipefail, a journalctl cut off by
    # SIGPIPE after an early match would count as "not found".
    journal_has() { journal_after "$1" -u "$2" | grep -F -- "$3" >/dev/null; }

    unit_is() { [ "$(prop "$1" ActiveState)" = "$2" ]; }
    # The README's probe: the packaged server listens with TLS, its
    # certificate names 127.0.0.1 (health's default address).
    health() { c contactd health --tls-ca-cert "$TLS/ca.pem"; }

    # `contactd agents --json`: is agent $1 connected? (python3 on the host
    # reads the JSON; the container has no jq or python.)
    agent_connected() {
        c contactd agents --json | python3 -c '
import json, sys
rows = json.load(sys.stdin)["agents"]
sys.exit(0 if any(r["name"] == sys.argv[1] and r["named"] and r["connected"] for r in rows) else 1)
' "$1"
    }

    # Highest N among retained tasks whose text is "$1N".
    max_task_seq() {
        c contactd tasks --socket /run/contactd/admin.sock --json | python3 -c '
import json, sys
rows = json.load(sys.stdin)["tasks"]
seqs = [int(r["text"][len(sys.argv[1]):]) for r in rows if r["text"].startswith(sys.argv[1])]
print(max(seqs, default=-1))
' "$1"
    }
    task_after() { [ "$(max_task_seq "$1")" -gt "$2" ]; }

    # Tasks "$1N" with $2 < N <= $3: how many are retained, and how many of
    # them no agent has acked yet.
    acked_between() {
        c contactd tasks --socket /run/contactd/admin.sock --json | python3 -c '
import json, sys
p, lo, hi = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rows = [r for r in json.load(sys.stdin)["tasks"]
        if r["text"].startswith(p) and lo < int(r["text"][len(p):]) <= hi]
print(len(rows), sum(1 for r in rows if r["acked"] < 1))
' "$1" "$2" "$3"
    }
    all_acked_between() { [ "$(acked_between "$@" | cut -d' ' -f2)" = 0 ]; }

    # A client that opens a TCP connection to the Contact port every 10 ms
    # (at most 6000 times, a minute) until /root/$1.stop exists, then writes
    # "CONNECTED REFUSED" to /root/$1. Started in the background; it says
    # it runs by creating /root/$1.started.
    probe_start() {
        c bash -c '
            ok=0 refused=0
            touch "/root/$1.started"
            for _ in $(seq 6000); do
                [ -e "/root/$1.stop" ] && break
                if (exec 3<>/dev/tcp/127.0.0.1/55555) 2>/dev/null; then
                    ok=$((ok + 1))
                else
                    refused=$((refused + 1))
                fi
                sleep 0.01
            done
            echo "$ok $refused" >"/root/$1"' _ "$1" &
        probe_pid=$!
        wait_until 10 "the connection probe $1 runs" c test -e "/root/$1.started"
    }
    # Stops probe $1 and checks that no connection was refused.
    probe_check() {
        local result
        c touch "/root/$1.stop"
        wait "$probe_pid" || fail "the connection probe $1 failed"
        result=$(c cat "/root/$1")
        [ "${result#* }" = 0 ] || fail "$2: ${result#* } of $((${result% *} + ${result#* })) connections (one every 10 ms) were refused"
        [ "${result% *}" -gt 0 ] || fail "$2: the probe made no connection"
        ok "$2: ${result% *} connections (one every 10 ms), none refused"
    }

    stop_container() {
        local rc=$? start
        trap - EXIT
        if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
            start=$(now_ns)
            kill -TERM "$nspawn_pid" 2>/dev/null || true
            # The container halts in about a second (20 s on a loaded
            # machine); the outer trap kills whatever is left after 60 s.
            while kill -0 "$nspawn_pid" 2>/dev/null && [ $(($(now_ns) - start)) -lt 60000000000 ]; do
                sleep 0.1
            done
            if kill -0 "$nspawn_pid" 2>/dev/null; then
                say "the container did not stop within 60s" >&2
            else
                say "container stopped in $(since "$start")s"
            fi
        fi
        exit "$rc"
    }
    trap stop_container EXIT

    mkdir -p "$WORK/upper" "$WORK/work" "$WORK/root"
    mount -t overlay overlay -o "lowerdir=$ROOTFS,upperdir=$WORK/upper,workdir=$WORK/work" "$WORK/root"
    # A minbase rootfs has no /etc/hosts (the installer writes it on a real
    # system): Debian's, so that the agent can reach https://localhost.
    if [ ! -e "$WORK/root/etc/hosts" ]; then
        printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$WORK/root/etc/hosts"
    fi
    cp "$DEB" "$WORK/root/root/contactd.deb"
    cp "$DEB_NEW" "$WORK/root/root/contactd-new.deb"
    # systemd-nspawn starts from this shell's cgroups (made by the outer script).
    echo "$BASHPID" >"/sys/fs/cgroup/systemd/$NAME/cgroup.procs"
    echo "$BASHPID" >"/sys/fs/cgroup/unified/$NAME/cgroup.procs"

    boot_start=$(now_ns)
    SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 systemd-nspawn -D "$WORK/root" --boot \
        --register=no --keep-unit --machine="$NAME" --private-network \
        --console=read-only --system-call-filter=bpf >"$WORK/console.log" 2>&1 &
    nspawn_pid=$!
    find_systemd() {
        kill -0 "$nspawn_pid" 2>/dev/null || {
            cat "$WORK/console.log" >&2
            fail "systemd-nspawn exited"
        }
        cpid=$(ps -o pid= -o comm= --ppid "$nspawn_pid" | awk '$2 == "systemd" { print $1 }')
        [ -n "$cpid" ]
    }
    until find_systemd; do
        [ $(($(now_ns) - boot_start)) -lt 30000000000 ] || fail "no systemd under systemd-nspawn after 30 s"
        sleep 0.1
    done
    wait_until 30 "the container's systemd listens (/run/systemd/private)" c test -S /run/systemd/private
    state=$(c timeout 60 systemctl is-system-running --wait || true)
    if [ "$state" != running ]; then
        c systemctl --failed --no-pager >&2 || true
        fail "container's systemd is $state, not running"
    fi
    ok "booted: $(c systemctl --version | head -n 1), system running (after $(since "$boot_start")s)"

    # --- install --------------------------------------------------------------
    # As the README says: apt install ./contactd_*.deb (its dependencies are
    # all in the rootfs; the container has no network).
    step=$(now_ns)
    pkg sh -c 'cd /root && apt-get install -y -q --no-install-recommends ./contactd.deb'
    expect "package state after install" "install ok installed" "$(c dpkg-query -W -f='${Status}' contactd)"
    expect "contactd.service enabled after install" enabled "$(c systemctl is-enabled contactd || true)"
    expect "contactd.service active after install" active "$(prop contactd ActiveState)"
    expect "contactd.socket enabled after install" enabled "$(c systemctl is-enabled contactd.socket || true)"
    expect "contactd.socket active after install" active "$(prop contactd.socket ActiveState)"
    c journalctl --no-pager -q -o cat -u contactd | grep -F 'listening on a socket passed by systemd ([server] listen)' >/dev/null ||
        fail "contactd did not take the Contact port from contactd.socket"
    c journalctl --no-pager -q -o cat -u contactd | grep -F 'listening on a socket passed by systemd ([metrics] listen)' >/dev/null ||
        fail "contactd did not take the metrics port from contactd.socket"
    ok "contactd took both ports from contactd.socket (socket activation)"
    expect "contactd-agent.service not enabled after install" disabled "$(c systemctl is-enabled contactd-agent || true)"
    expect "contactd-agent.service not started after install" inactive "$(prop contactd-agent ActiveState)"
    c getent passwd contactd >/dev/null || fail "no user contactd after install"
    ok "user contactd: $(c getent passwd contactd)"
    # The man pages and completions build-deb.sh generated (the minbase
    # container has no man-db or shells to try them in: the files).
    for f in /usr/share/man/man1/contactd.1.gz /usr/share/man/man1/contactd-task-submit.1.gz \
        /usr/share/bash-completion/completions/contactd /usr/share/zsh/vendor-completions/_contactd \
        /usr/share/fish/vendor_completions.d/contactd.fish; do
        c test -s "$f" || fail "$f missing or empty after install"
    done
    ok "man pages ($(c sh -c 'ls /usr/share/man/man1/contactd*.1.gz | wc -l')) and bash, zsh, fish completions installed"
    expect "/var/log/contactd after install" "750 contactd contactd" "$(c stat -c '%a %U %G' /var/log/contactd)"
    expect "/var/lib/contactd after install" "750 contactd contactd" "$(c stat -c '%a %U %G' /var/lib/contactd)"
    expect "the task store after install" "contactd contactd" "$(c stat -c '%U %G' /var/lib/contactd/contactd.db)"
    expect "$TLS after install" "750 root contactd" "$(c stat -c '%a %U %G' "$TLS")"
    expect "$TLS/server.key after install" "640 root contactd" "$(c stat -c '%a %U %G' "$TLS/server.key")"
    expect "$TLS/ca.key after install" "600 root root" "$(c stat -c '%a %U %G' "$TLS/ca.key")"
    expect "$TLS/server.pem after install" "644 root root" "$(c stat -c '%a %U %G' "$TLS/server.pem")"
    expect "$TLS/ca.pem after install" "644 root root" "$(c stat -c '%a %U %G' "$TLS/ca.pem")"
    ca_sum=$(c md5sum "$TLS/ca.pem" "$TLS/server.pem")
    expect "STATUS= of contactd.service" "serving on [::]:55555" "$(prop contactd StatusText)"
    c systemctl status --no-pager contactd | grep -F 'Status: "serving on [::]:55555"' >/dev/null ||
        fail "systemctl status does not show the STATUS= line"
    ok "systemctl status shows: Status: \"serving on [::]:55555\""
    health >/dev/null || fail "contactd health (TLS, verified with $TLS/ca.pem): not SERVING (exit $?)"
    ok "contactd health over TLS inside the container: $(health)"
    if c contactd health --addr 127.0.0.1:55555 --timeout 2s >/dev/null 2>&1; then
        fail "contactd health in plaintext answered: the packaged server does not use TLS"
    fi
    ok "a plaintext probe is refused (the packaged server speaks TLS only)"
    # The packaged config serves metrics on loopback (README "Monitoring");
    # the container has bash's /dev/tcp, not curl.
    scrape() {
        c bash -c 'exec 3<>/dev/tcp/127.0.0.1/9466 &&
            printf "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n" >&3 && cat <&3'
    }
    metrics=$(scrape) || fail "nothing answers GET /metrics on 127.0.0.1:9466"
    printf '%s\n' "$metrics" | grep -F 'HTTP/1.1 200 OK' >/dev/null ||
        fail "GET /metrics on 127.0.0.1:9466: $(printf '%s\n' "$metrics" | head -n 1)"
    printf '%s\n' "$metrics" | grep -E '^contactd_serving 1$' >/dev/null ||
        fail "GET /metrics does not say contactd_serving 1"
    ok "GET /metrics on 127.0.0.1:9466: $(printf '%s\n' "$metrics" | grep -c '^contactd_') samples, contactd_serving 1"
    for file in contactd-dashboard.json contactd-alerts.yml contactd-alerts.test.yml; do
        c test -s "/usr/share/contactd/monitoring/$file" || fail "/usr/share/contactd/monitoring/$file is not installed"
    done
    ok "dashboard and alert rules in /usr/share/contactd/monitoring/"
    expect "NRestarts after install" 0 "$(prop contactd NRestarts)"
    c journalctl --no-pager -q -o cat -u contactd | grep -F 'commands run in cgroups of their own' >/dev/null ||
        fail "contactd.service cannot make cgroups for remote commands (Delegate=yes)"
    ok "remote commands get cgroups of their own under contactd.service (Delegate=yes)"
    say "install checks took $(since "$step")s"

    # --- reload -----------------------------------------------------------------
    # A task every second from a recognisable template: visible with
    # `contactd tasks` as soon as the reload applies.
    pid=$(prop contactd MainPID)
    c sed -i -e 's/^interval = "40s"$/interval = "1s"/' -e 's/^batch = 10$/batch = 1/' \
        -e 's/^template = "task:{rand}"$/template = "ci-reload-{seq}"/' /etc/contactd.toml
    c contactd check-config -c /etc/contactd.toml >/dev/null || fail "the edited config does not check"
    mark=$(cursor)
    c systemctl reload contactd || fail "systemctl reload contactd failed"
    wait_until 10 "journal: config reloaded" journal_has "$mark" contactd "config reloaded"
    wait_until 10 "the reload applied: a task from the new template" task_after ci-reload- -1
    expect "contactd.service after reload" active "$(prop contactd ActiveState)"
    expect "NRestarts after reload" 0 "$(prop contactd NRestarts)"
    expect "MainPID after reload" "$pid" "$(prop contactd MainPID)"

    # --- invalid reload -----------------------------------------------------------
    c cp /etc/contactd.toml /root/good.toml
    c sed -i -e 's/^template = "ci-reload-{seq}"$/template = "ci-bad-{seq}"/' /etc/contactd.toml
    c sh -c 'echo "bogus_key = 1" >>/etc/contactd.toml'
    last=$(max_task_seq ci-reload-)
    mark=$(cursor)
    c systemctl reload contactd || fail "systemctl reload contactd (invalid config) failed"
    wait_until 10 "journal: config reload failed, keeping the current config" \
        journal_has "$mark" contactd "config reload failed, keeping the current config"
    journal_has "$mark" contactd "/etc/contactd.toml:" || fail "the journal does not name the file:line of the problem"
    ok "journal names the problem: $(journal_after "$mark" -u contactd | grep -F 'bogus_key' | head -n 1)"
    wait_until 10 "the old config stays in force: a newer task from the old template" task_after ci-reload- "$last"
    expect "tasks from the invalid config's template" -1 "$(max_task_seq ci-bad-)"
    expect "contactd.service after an invalid reload" active "$(prop contactd ActiveState)"
    expect "MainPID after an invalid reload" "$pid" "$(prop contactd MainPID)"
    expect "NRestarts after an invalid reload" 0 "$(prop contactd NRestarts)"

    # --- watchdog -----------------------------------------------------------------
    # WatchdogTimestamp is the last WATCHDOG=1 systemd received: one later than
    # WatchdogSec after the start, same process, proves the pings keep it alive.
    wd_us=$(prop contactd WatchdogUSec)
    wd_us=$(c systemd-analyze timespan "$wd_us" | awk '$1 == "μs:" || $1 == "us:" { print $2 }')
    if [ -z "$wd_us" ] || [ "$wd_us" -eq 0 ]; then fail "contactd.service has no WatchdogSec"; fi
    started_us=$(prop contactd ExecMainStartTimestampMonotonic)
    pinged_late() {
        [ "$(prop contactd WatchdogTimestampMonotonic)" -gt $((started_us + wd_us)) ] &&
            unit_is contactd active && [ "$(prop contactd MainPID)" = "$pid" ]
    }
    wait_until $((wd_us / 1000000 + 20)) "a watchdog ping later than WatchdogSec ($((wd_us / 1000000))s) after the start, same process" pinged_late
    expect "NRestarts after WatchdogSec" 0 "$(prop contactd NRestarts)"

    # --- invalid config + restart -------------------------------------------------
    mark=$(cursor)
    if c systemctl restart contactd 2>/dev/null; then fail "systemctl restart succeeded with an invalid config"; fi
    # failed/failed, not activating/auto-restart: systemd will not try again.
    expect "contactd.service after a restart with an invalid config" failed/failed \
        "$(prop contactd ActiveState)/$(prop contactd SubState)"
    journal_has "$mark" contactd "status=78/CONFIG" || fail "the journal does not show exit status 78"
    ok "journal: $(journal_after "$mark" -u contactd | grep -F 'status=78/CONFIG' | head -n 1)"
    journal_has "$mark" contactd "bogus_key" || fail "the journal does not show the config problem"
    ok "journal: $(journal_after "$mark" -u contactd | grep -F 'bogus_key' | head -n 1)"
    expect "exit status of the failed start" 78 "$(prop contactd ExecMainStatus)"
    expect "Result of the failed start" exit-code "$(prop contactd Result)"
    expect "NRestarts after a failed restart (no restart loop)" 0 "$(prop contactd NRestarts)"
    c cp /root/good.toml /etc/contactd.toml
    c systemctl restart contactd || fail "restart with the config restored failed"
    expect "contactd.service after restoring the config" active "$(prop contactd ActiveState)"

    # --- agent, with a certificate from `contactd tls issue` ----------------------------
    # As the README says for an agent on the server's host.
    c contactd tls issue "$AGENT" --dir "$TLS" --group contactd >/dev/null ||
        fail "contactd tls issue $AGENT --group contactd failed"
    expect "the agent's key: mode and group" "640 contactd" "$(c stat -c '%a %G' "$TLS/$AGENT.key")"
    ok "contactd tls issue $AGENT: $(c ls "$TLS" | tr '\n' ' ')"
    c sed -i -e "s|^servers = .*|servers = [\"https://localhost:55555\"]|" \
        -e "s|^# name = \"web-01\"$|name = \"$AGENT\"|" \
        -e "s|^# ca = \"$TLS/ca.pem\"$|ca = \"$TLS/ca.pem\"|" \
        -e "s|^# cert = \"$TLS/agent.pem\"$|cert = \"$TLS/$AGENT.pem\"|" \
        -e "s|^# key = \"$TLS/agent.key\"$|key = \"$TLS/$AGENT.key\"|" /etc/contactd-agent.toml
    for line in "servers = [\"https://localhost:55555\"]" "name = \"$AGENT\"" "ca = \"$TLS/ca.pem\"" \
        "cert = \"$TLS/$AGENT.pem\"" "key = \"$TLS/$AGENT.key\""; do
        c grep -qxF "$line" /etc/contactd-agent.toml || fail "could not set '$line' in /etc/contactd-agent.toml"
    done
    c contactd check-config --agent -c /etc/contactd-agent.toml >/dev/null || fail "the agent config does not check"
    mark=$(cursor)
    c systemctl enable --now contactd-agent || fail "systemctl enable --now contactd-agent failed"
    expect "contactd-agent.service enabled" enabled "$(c systemctl is-enabled contactd-agent)"
    wait_until 30 "contactd agents lists $AGENT as connected (client_auth = \"request\": with its certificate)" agent_connected "$AGENT"
    wait_until 10 "journal: the agent connected over TLS" journal_has "$mark" contactd-agent "connected to https://localhost:55555"
    expect "agent STATUS=" "connected to https://localhost:55555" "$(prop contactd-agent StatusText)"
    agent_pid=$(prop contactd-agent MainPID)
    # Across the restart: the socket stays open (no connection refused), the
    # agent comes back at once, and every task is acked.
    # The tasks published since the agent connected: each one is acked.
    joined=$(max_task_seq ci-reload-)
    wait_until 10 "a task published after the agent connected" task_after ci-reload- "$joined"
    before=$(max_task_seq ci-reload-)
    wait_until 30 "the agent acked every task since it connected" all_acked_between ci-reload- "$joined" "$before"
    probe_start probe-restart
    mark=$(cursor)
    c systemctl restart contactd || fail "systemctl restart contactd failed"
    wait_until 30 "journal: the agent reconnected after systemctl restart contactd" \
        journal_has "$mark" contactd-agent "connected to"
    wait_until 30 "contactd agents lists $AGENT as connected again" agent_connected "$AGENT"
    agent_took_hint() {
        c journalctl --no-pager -q -o cat -u contactd-agent | grep -F 'reconnecting as it asks' >/dev/null
    }
    wait_until 10 "journal: the agent took the server's shutdown as a request to come back" agent_took_hint
    probe_check probe-restart "across systemctl restart contactd"
    expect "contactd.socket across the restart (not restarted)" active "$(prop contactd.socket ActiveState)"
    wait_until 10 "a task generated after the restart" task_after ci-reload- $((before + 2))
    after=$(max_task_seq ci-reload-)
    wait_until 30 "the agent acked every task from before, during and after the restart" all_acked_between ci-reload- "$joined" "$after"
    ok "tasks ci-reload-$((joined + 1))..$after: $(acked_between ci-reload- "$joined" "$after" | cut -d' ' -f1) retained, each acked (none lost across the restart)"
    expect "contactd-agent.service across the server's restart" active "$(prop contactd-agent ActiveState)"
    expect "agent MainPID across the server's restart" "$agent_pid" "$(prop contactd-agent MainPID)"
    expect "agent NRestarts across the server's restart" 0 "$(prop contactd-agent NRestarts)"

    # --- systemd-analyze security ---------------------------------------------------
    exposure() { c systemd-analyze security --no-pager "$1" | sed -nE 's/.*Overall exposure level for .*: *([0-9]+(\.[0-9]+)?).*/\1/p'; }
    expect "systemd-analyze security contactd.service (offline score: $SERVER_EXPOSURE)" "$SERVER_EXPOSURE" "$(exposure contactd.service)"
    expect "systemd-analyze security contactd-agent.service (offline score: $AGENT_EXPOSURE)" "$AGENT_EXPOSURE" "$(exposure contactd-agent.service)"

    # --- upgrade ----------------------------------------------------------------------
    c sed -i '1i # edited by test-in-systemd before the upgrade' /etc/contactd.toml
    pid=$(prop contactd MainPID)
    agent_pid=$(prop contactd-agent MainPID)
    new_version=$(dpkg-deb -f "$DEB_NEW" Version)
    before=$(max_task_seq ci-reload-)
    probe_start probe-upgrade
    mark=$(cursor)
    pkg dpkg -i /root/contactd-new.deb
    expect "version after the upgrade" "$new_version" "$(c dpkg-query -W -f='${Version}' contactd)"
    expect "package state after the upgrade" "install ok installed" "$(c dpkg-query -W -f='${Status}' contactd)"
    c grep -qx '# edited by test-in-systemd before the upgrade' /etc/contactd.toml || fail "the upgrade lost the edit of /etc/contactd.toml"
    c grep -qF 'template = "ci-reload-{seq}"' /etc/contactd.toml || fail "the upgrade lost the edit of /etc/contactd.toml"
    c grep -qxF "name = \"$AGENT\"" /etc/contactd-agent.toml || fail "the upgrade lost the edit of /etc/contactd-agent.toml"
    ok "/etc/contactd.toml and /etc/contactd-agent.toml keep their edits across the upgrade"
    if c sh -c 'ls /etc/contactd*.dpkg-* 2>/dev/null' | grep . >/dev/null; then fail "the upgrade left a .dpkg-* file"; fi
    expect "TLS files across the upgrade (kept, not made again)" "$ca_sum" "$(c md5sum "$TLS/ca.pem" "$TLS/server.pem")"
    expect "contactd.service after the upgrade" active "$(prop contactd ActiveState)"
    [ "$(prop contactd MainPID)" != "$pid" ] || fail "contactd.service was not restarted by the upgrade"
    expect "starts of contactd.service during the upgrade" 1 "$(journal_after "$mark" -u contactd | grep -cF "$SERVER_STARTED" || true)"
    expect "NRestarts after the upgrade" 0 "$(prop contactd NRestarts)"
    expect "contactd.service enabled after the upgrade" enabled "$(c systemctl is-enabled contactd)"
    expect "contactd-agent.service enabled after the upgrade" enabled "$(c systemctl is-enabled contactd-agent)"
    expect "contactd-agent.service after the upgrade" active "$(prop contactd-agent ActiveState)"
    [ "$(prop contactd-agent MainPID)" != "$agent_pid" ] || fail "the running contactd-agent.service was not restarted by the upgrade"
    ok "the running contactd-agent.service was restarted by the upgrade"
    health >/dev/null || fail "contactd health after the upgrade: not SERVING"
    ok "contactd health after the upgrade: SERVING"
    # The store (/var/lib/contactd/contactd.db) outlived the restart: the
    # tasks from before are listed, and new ones get higher ids.
    task_after ci-reload- $((before - 1)) || fail "the tasks from before the upgrade are gone (latest ci-reload-$before)"
    ok "tasks from before the upgrade still listed (up to ci-reload-$before)"
    wait_until 10 "a task generated after the upgrade has a higher id than every earlier one" task_after ci-reload- "$before"
    wait_until 30 "contactd agents lists $AGENT as connected after the upgrade" agent_connected "$AGENT"
    probe_check probe-upgrade "across the upgrade"
    expect "contactd.socket after the upgrade" active "$(prop contactd.socket ActiveState)"
    expect "contactd.socket enabled after the upgrade" enabled "$(c systemctl is-enabled contactd.socket)"
    wait_until 10 "a task generated after the upgrade's restart" task_after ci-reload- $(($(max_task_seq ci-reload-) + 1))
    after=$(max_task_seq ci-reload-)
    wait_until 30 "the agent acked every task from before, during and after the upgrade" all_acked_between ci-reload- "$joined" "$after"
    ok "tasks ci-reload-$((joined + 1))..$after: $(acked_between ci-reload- "$joined" "$after" | cut -d' ' -f1) retained, each acked (none lost across the upgrade)"

    # --- stop ---------------------------------------------------------------------------
    # The socket first, or a connection would start the server again.
    c systemctl stop contactd.socket || fail "systemctl stop contactd.socket failed"
    for unit in contactd-agent contactd; do
        c systemctl stop "$unit" || fail "systemctl stop $unit failed"
        expect "$unit.service after stop" inactive "$(prop "$unit" ActiveState)"
        expect "$unit.service Result after stop" success "$(prop "$unit" Result)"
        expect "$unit.service exit status after stop" 0 "$(prop "$unit" ExecMainStatus)"
    done

    # --- remove, purge --------------------------------------------------------------
    c systemctl start contactd.socket contactd contactd-agent || fail "systemctl start failed"
    pkg apt-get remove -y -q contactd
    expect "package state after remove" "deinstall ok config-files" "$(c dpkg-query -W -f='${Status}' contactd)"
    for unit in contactd contactd-agent; do
        expect "$unit.service after remove" inactive "$(prop "$unit" ActiveState)"
    done
    expect "contactd.socket after remove" inactive "$(prop contactd.socket ActiveState)"
    c test -f /etc/contactd.toml || fail "removal deleted /etc/contactd.toml"
    c test -f "$TLS/ca.key" || fail "removal deleted $TLS"
    ok "/etc/contactd.toml and $TLS kept by remove"

    pkg dpkg --purge contactd
    expect "package state after purge" "not installed" \
        "$(c dpkg-query -W -f='${Status}' contactd 2>/dev/null | grep -v 'not-installed' || echo not installed)"
    for path in /etc/contactd.toml /etc/contactd-agent.toml /etc/contactd /var/log/contactd /var/lib/contactd /var/lib/contactd-agent \
        /usr/lib/systemd/system/contactd.service /usr/lib/systemd/system/contactd-agent.service \
        /usr/lib/systemd/system/contactd.socket /etc/systemd/system/sockets.target.wants/contactd.socket \
        /etc/systemd/system/multi-user.target.wants/contactd.service \
        /etc/systemd/system/multi-user.target.wants/contactd-agent.service /usr/bin/contactd; do
        c test ! -e "$path" -a ! -L "$path" || fail "$path is still there after purge"
    done
    left=$(c find /etc/systemd /var/lib/systemd/deb-systemd-helper-enabled /var/lib/systemd/deb-systemd-helper-masked \
        -name '*contactd*' 2>/dev/null || true)
    [ -z "$left" ] || fail "systemd state left after purge: $left"
    ok "purge removed the config, TLS files, logs, agent state, units and their enablement"
    for unit in contactd contactd-agent; do
        expect "$unit.service after purge" not-found "$(prop "$unit" LoadState)"
    done
    c getent passwd contactd >/dev/null || fail "purge removed the user contactd"
    ok "user contactd stays after purge (Debian policy for system users)"
    if c pgrep -u contactd >/dev/null; then fail "processes of user contactd left after purge"; fi
    ok "no process of user contactd left"

    say "$passed checks passed, 0 failed"
    exit 0
fi

# ---------------------------------------------------------------------------
# On the host.
# ---------------------------------------------------------------------------
usage() {
    sed -n '6,8s/^# \{0,1\}//p' "$self" >&2
    exit 2
}
binary=
debs=()
prepare=
case "${1:-}" in
--binary) [ $# -eq 2 ] || usage; binary=$2 ;;
--prepare) [ $# -eq 1 ] || usage; prepare=1 ;;
-h | --help | "") usage ;;
*) [ $# -eq 2 ] || usage; debs=("$(realpath "$1")" "$(realpath "$2")") ;;
esac
[ "$(id -u)" -eq 0 ] || die "needs root (systemd-nspawn, mounts, cgroups)"
total_start=$(now_ns)

# --- 0. what is missing (systemd for check-units.sh too) ---------------------------
install_missing() {
    local missing=() step
    command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v lintian >/dev/null || missing+=(lintian)
    if [ ${#missing[@]} -gt 0 ]; then
        step=$(now_ns)
        say "installing ${missing[*]}"
        apt-get update -qq
        # No recommends: libnss-mymachines would edit the host's nsswitch.conf.
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        say "installed ${missing[*]} in $(since "$step")s"
    fi
}

# A debootstrapped rootfs, built once into the cache.
build_rootfs() {
    local mirror step tmp_rootfs
    mirror=$(sed -nE 's/^URIs: *([^ ]+).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null |
        grep -v security | head -n 1 || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    mkdir -p "$CACHE"
    exec 9>"$CACHE/.lock"
    flock 9 # one rootfs builder at a time
    if [ "$(cat "$ROOTFS/.contactd-ci-recipe" 2>/dev/null)" != "$RECIPE" ]; then
        step=$(now_ns)
        rm -rf "$CACHE/.rootfs-$SUITE".* # left by interrupted runs
        tmp_rootfs=$(mktemp -d "$CACHE/.rootfs-$SUITE.XXXXXX")
        say "building the $SUITE rootfs from $mirror: $RECIPE"
        # shellcheck disable=SC2086 # the recipe is words
        ${RECIPE%% *} ${RECIPE#* } "$tmp_rootfs/root" "$mirror" >"$tmp_rootfs/debootstrap.log" 2>&1 || {
            tail -n 30 "$tmp_rootfs/debootstrap.log" >&2
            rm -rf "$tmp_rootfs"
            die "debootstrap failed"
        }
        echo "$RECIPE" >"$tmp_rootfs/root/.contactd-ci-recipe"
        if [ -e "$ROOTFS" ]; then mv "$ROOTFS" "$tmp_rootfs/old"; fi
        mv "$tmp_rootfs/root" "$ROOTFS"
        rm -rf "$tmp_rootfs"
        say "rootfs $ROOTFS built in $(since "$step")s"
    else
        say "reusing the cached rootfs $ROOTFS"
    fi
    flock -u 9
}

install_missing
if [ -n "$prepare" ]; then
    build_rootfs
    say "prepared in $(since "$total_start")s"
    exit 0
fi

scratch=$(mktemp -d /var/tmp/contactd-test-in-systemd.XXXXXX)
name=contactd-ci-$$
cleanup() {
    local rc=$? start cg pids
    trap - EXIT INT TERM
    start=$(now_ns)
    # Whatever the inner script left (container, services, nsenter): every
    # process in the cgroups made below, then the cgroups themselves.
    for cg in /sys/fs/cgroup/*/"$name"; do
        [ -d "$cg" ] || continue
        pids=$(find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u)
        if [ -n "$pids" ]; then
            say "cleanup: killing processes left in $cg: $(echo "$pids" | tr '\n' ' ')"
            # shellcheck disable=SC2086 # a list of pids
            kill -KILL $pids 2>/dev/null || true
        fi
    done
    for cg in /sys/fs/cgroup/*/"$name"; do
        [ -d "$cg" ] || continue
        while [ -n "$(find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null)" ] &&
            [ $(($(now_ns) - start)) -lt 10000000000 ]; do
            sleep 0.1
        done
        find "$cg" -depth -type d -exec rmdir {} \; 2>/dev/null || say "cleanup: cannot remove $cg"
    done
    rm -rf "/run/systemd/nspawn/propagate/$name" "$scratch"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. the packages, lintian -------------------------------------------------------
if [ -n "$binary" ]; then
    step=$(now_ns)
    deb=$(packaging/build-deb.sh --binary "$binary" --out "$scratch/debs" --compression gzip)
    version=$(dpkg-deb -f "$deb" Version)
    deb_new=$(packaging/build-deb.sh --binary "$binary" --out "$scratch/debs" --compression gzip \
        --version "${version}+ci1")
    say "built $(basename "$deb") and $(basename "$deb_new") (for the upgrade) in $(since "$step")s"
else
    deb=${debs[0]} deb_new=${debs[1]}
    dpkg --compare-versions "$(dpkg-deb -f "$deb_new" Version)" gt "$(dpkg-deb -f "$deb" Version)" ||
        die "$deb_new does not have a higher version than $deb"
fi

step=$(now_ns)
say "$(lintian --version)"
lint_rc=0
lint_out=$(lintian --fail-on error,warning --display-info "$deb" 2>&1) || lint_rc=$?
# (As root, lintian adds that running as root "is not recommended".)
printf '%s\n' "$lint_out" | grep -v '^running with root privileges' | sed 's/^/    lintian: /' || true
if [ "$lint_rc" -ne 0 ]; then
    die "lintian: errors or warnings (exit $lint_rc; explain a warning in packaging/debian/lintian-overrides, or fix it)"
fi
say "lintian: no error or warning ($(since "$step")s)"

# --- 2. the rootfs (usually built already by --prepare) ----------------------------
build_rootfs

# --- 3., 4. the container and the checks -----------------------------------------
server_exposure=$(packaging/check-units.sh --exposure packaging/systemd/contactd.service)
agent_exposure=$(packaging/check-units.sh --exposure packaging/systemd/contactd-agent.service)
mkdir "/sys/fs/cgroup/systemd/$name" "/sys/fs/cgroup/unified/$name"
step=$(now_ns)
unshare --mount --propagation private -- "$self" --inside "$scratch" "$name" "$(realpath "$deb")" \
    "$(realpath "$deb_new")" "$server_exposure" "$agent_exposure"
say "container test took $(since "$step")s; whole script $(since "$total_start")s"
