#!/usr/bin/env bash
# Build the Debian package of contactd with dpkg-deb, from a staged tree.
#
#   packaging/build-deb.sh [--binary PATH] [--version V] [--out DIR] [--compression TYPE]
#
#   --binary PATH  package this contactd binary (a stripped copy of it);
#                  default: `cargo build --release`, then target/release/contactd
#   --version V    the package's version; default: Cargo.toml's version with
#                  the Debian revision -1 (0.1.0 -> 0.1.0-1)
#   --out DIR      where to write contactd_<version>_<arch>.deb; default:
#                  target/debian
#   --compression TYPE  dpkg-deb's compressor: xz (the default, as in Debian's
#                  archive) or gzip (a larger .deb, built 10 times faster:
#                  what the tests use); zstd is faster still, but lintian
#                  calls such a .deb malformed
#
# Prints the path of the .deb on stdout (everything else goes to stderr).
# Needs dpkg-deb, strip (binutils) and gzip; uses dpkg-shlibdeps (dpkg-dev)
# for the libc6/libgcc-s1 dependency if it is there, objdump otherwise.
#
# What goes where (packaging/debian/ holds the package's own files):
#   /usr/bin/contactd                             the binary, stripped
#   /etc/contactd.toml, /etc/contactd-agent.toml  config/*.toml (conffiles)
#   /usr/lib/systemd/system/*.service, *.socket   packaging/systemd/
#   /usr/lib/sysusers.d/contactd.conf             packaging/sysusers.d/
#   /usr/lib/tmpfiles.d/contactd.conf             packaging/tmpfiles.d/
#   /usr/share/doc/contactd/                      copyright, changelog.Debian.gz, README.md
#   /usr/share/man/man1/contactd*.1.gz            `contactd man`: a page per command
#   /usr/share/bash-completion/completions/contactd, /usr/share/zsh/vendor-completions/_contactd,
#   /usr/share/fish/vendor_completions.d/contactd.fish   `contactd completions SHELL`
#   /usr/share/contactd/monitoring/               packaging/monitoring/: Grafana dashboard,
#                                                 Prometheus alert rules and their tests
#   /usr/share/lintian/overrides/contactd         packaging/debian/lintian-overrides
#   DEBIAN/control                                packaging/debian/control, filled in
#   DEBIAN/{conffiles,postinst,prerm,postrm}      packaging/debian/
#   DEBIAN/md5sums                                computed (conffiles excluded, as dh_md5sums)
set -euo pipefail

cd "$(dirname "$(realpath "$0")")/.."
export LC_ALL=C

die() {
    echo "build-deb: $*" >&2
    exit 1
}
usage() {
    sed -n '3,16s/^# \{0,1\}//p' "$0" >&2
    exit 2
}

binary=
version=
out=target/debian
compression=xz
while [ $# -gt 0 ]; do
    case "$1" in
    --binary) binary=${2:?--binary needs a path}; shift 2 ;;
    --version) version=${2:?--version needs a version}; shift 2 ;;
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    --compression) compression=${2:?--compression needs a type}; shift 2 ;;
    -h | --help) usage ;;
    *) echo "build-deb: unknown argument '$1'" >&2; usage ;;
    esac
done

for tool in dpkg-deb strip gzip; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install dpkg binutils gzip)"
done

if [ -z "$binary" ]; then
    echo "build-deb: cargo build --release" >&2
    cargo build --release >&2
    binary=target/release/contactd
fi
if [ ! -f "$binary" ] || [ ! -x "$binary" ]; then
    die "$binary: not an executable file"
fi

if [ -z "$version" ]; then
    upstream=$(sed -n '/^\[package\]/,/^\[/s/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml | head -n 1)
    [ -n "$upstream" ] || die "no version in Cargo.toml's [package]"
    version=$upstream-1
fi
arch=$(dpkg --print-architecture)

umask 022
stage=$(mktemp -d "${TMPDIR:-/tmp}/contactd-deb.XXXXXX")
trap 'rm -rf "$stage"' EXIT
root=$stage/root

# --- files -----------------------------------------------------------------------
install -d "$root/DEBIAN" "$root/usr/bin" "$root/etc" "$root/usr/lib/systemd/system" \
    "$root/usr/lib/sysusers.d" "$root/usr/lib/tmpfiles.d" "$root/usr/share/doc/contactd" \
    "$root/usr/share/lintian/overrides" "$root/usr/share/contactd/monitoring"
# As dh_strip does for executables.
strip --remove-section=.comment --remove-section=.note -o "$root/usr/bin/contactd" "$binary"
chmod 0755 "$root/usr/bin/contactd"
install -m 0644 config/contactd.toml "$root/etc/contactd.toml"
install -m 0644 config/contactd-agent.toml "$root/etc/contactd-agent.toml"
install -m 0644 packaging/systemd/contactd.socket packaging/systemd/contactd.service \
    packaging/systemd/contactd-agent.service "$root/usr/lib/systemd/system/"
install -m 0644 packaging/sysusers.d/contactd.conf "$root/usr/lib/sysusers.d/"
install -m 0644 packaging/tmpfiles.d/contactd.conf "$root/usr/lib/tmpfiles.d/"
install -m 0644 packaging/debian/copyright README.md "$root/usr/share/doc/contactd/"
install -m 0644 packaging/debian/lintian-overrides "$root/usr/share/lintian/overrides/contactd"
install -m 0644 packaging/monitoring/contactd-dashboard.json packaging/monitoring/contactd-alerts.yml \
    packaging/monitoring/contactd-alerts.test.yml "$root/usr/share/contactd/monitoring/"

# Man pages and shell completions, written by the binary being packaged from
# its own command line definitions: they cannot drift from its --help, and
# nothing generated is kept in git. (So the binary must run here: a
# cross-built one would need these made on its own architecture.)
install -d "$root/usr/share/man/man1" "$root/usr/share/bash-completion/completions" \
    "$root/usr/share/zsh/vendor-completions" "$root/usr/share/fish/vendor_completions.d"
"$root/usr/bin/contactd" man "$root/usr/share/man/man1" >/dev/null
gzip -9n "$root"/usr/share/man/man1/*.1
"$root/usr/bin/contactd" completions bash >"$root/usr/share/bash-completion/completions/contactd"
"$root/usr/bin/contactd" completions zsh >"$root/usr/share/zsh/vendor-completions/_contactd"
"$root/usr/bin/contactd" completions fish >"$root/usr/share/fish/vendor_completions.d/contactd.fish"
chmod 0644 "$root"/usr/share/man/man1/*.gz "$root/usr/share/bash-completion/completions/contactd" \
    "$root/usr/share/zsh/vendor-completions/_contactd" \
    "$root/usr/share/fish/vendor_completions.d/contactd.fish"

# The Debian changelog; a version other than its latest entry's (an upgrade
# test, a local rebuild) gets an entry of its own on top.
changelog=$root/usr/share/doc/contactd/changelog.Debian
latest=$(sed -n '1s/^contactd (\([^)]*\)).*/\1/p' packaging/debian/changelog)
if [ "$version" != "$latest" ]; then
    {
        printf 'contactd (%s) unstable; urgency=medium\n\n' "$version"
        printf '  * Local build of %s.\n\n' "$version"
        printf ' -- contactd maintainers <contactd@example.org>  %s\n\n' "$(date -R)"
    } >"$changelog"
fi
cat packaging/debian/changelog >>"$changelog"
gzip -9n "$changelog"

# --- DEBIAN/ -------------------------------------------------------------------------
install -m 0644 packaging/debian/conffiles "$root/DEBIAN/"
install -m 0755 packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm "$root/DEBIAN/"

# Shared libraries: dpkg-shlibdeps, as a Debian build would (it wants a
# debian/control beside it); else the newest GLIBC_ symbol version the
# binary needs, and libgcc-s1 if it links libgcc_s.
shlib_depends() {
    local dir=$stage/shlibdeps out
    mkdir -p "$dir/debian"
    printf 'Source: contactd\n\nPackage: contactd\nArchitecture: any\n' >"$dir/debian/control"
    if command -v dpkg-shlibdeps >/dev/null &&
        out=$(cd "$dir" && dpkg-shlibdeps -O "$root/usr/bin/contactd" 2>/dev/null); then
        printf '%s\n' "${out#shlibs:Depends=}"
        return
    fi
    command -v objdump >/dev/null || die "neither dpkg-shlibdeps nor objdump found (apt-get install dpkg-dev)"
    local glibc
    glibc=$(objdump -T "$root/usr/bin/contactd" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' |
        sort -t. -k1,1n -k2,2n -k3,3n -u | tail -n 1)
    [ -n "$glibc" ] || die "no GLIBC symbol versions in $binary"
    out="libc6 (>= $glibc)"
    if objdump -p "$root/usr/bin/contactd" | grep -q 'NEEDED *libgcc_s\.so\.1'; then
        out="$out, libgcc-s1 (>= 4.2)"
    fi
    printf '%s\n' "$out"
}
# systemd-sysusers and systemd-tmpfiles run by the postinst; /bin/kill
# (procps) for the units' ExecReload. deb-systemd-helper and
# deb-systemd-invoke come from init-system-helpers, which is Essential.
depends="$(shlib_depends), systemd | systemd-sysusers, systemd | systemd-tmpfiles, procps"

# md5sums of every file but the conffiles (dpkg keeps theirs itself).
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -print | sed 's#^\./##' | sort |
    grep -vxF -f <(sed 's#^/##' DEBIAN/conffiles) | xargs md5sum) >"$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/md5sums"

installed_size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@INSTALLED_SIZE@/$installed_size/" \
    -e "s/@DEPENDS@/$depends/" packaging/debian/control >"$root/DEBIAN/control"
if grep -q '@[A-Z_]*@' "$root/DEBIAN/control"; then
    die "unfilled field in DEBIAN/control: $(grep '@[A-Z_]*@' "$root/DEBIAN/control")"
fi

mkdir -p "$out"
deb=$out/contactd_${version}_${arch}.deb
dpkg-deb -Z"$compression" --build --root-owner-group "$root" "$deb" >&2
echo "build-deb: $deb ($(du -h "$deb" | cut -f1); the binary $(du -h "$root/usr/bin/contactd" | cut -f1) stripped)" >&2
printf '%s\n' "$deb"
