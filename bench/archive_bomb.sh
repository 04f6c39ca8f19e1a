#!/usr/bin/env bash
# Peak RSS and wall time of `bosun upload-release` on release tarball bombs
# (a few MB of gzip expanding to SIZE GiB of zeros), with the default
# archive limits and with BOSUN_MAX_ARCHIVE_SIZE=1G. Shapes:
#   member: one `packages/bomb.tgz` entry of SIZE GiB (not gzip inside)
#   spread: SIZE GiB of zeros in 64 MiB entries the reader skips
#   stored: `packages/bomb.tgz` is a real (uncompressed, "stored") gzip
#           of SIZE GiB, so it must be copied out before its sha256 is known
# Every upload is expected to fail; the figures are what failing costs.
# Usage: bench/archive_bomb.sh [SIZE_GIB (default 2)] [BOSUN_BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-2}
bosun=${2:-}
if [ -z "$bosun" ]; then
    cargo build -q
    bosun=target/debug/bosun
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 - "$work" "$size" <<'PY'
import io, sys, tarfile, zlib, gzip

work, size = sys.argv[1], int(sys.argv[2]) << 30
chunk = bytes(1 << 20)

class Zeros(io.RawIOBase):
    def __init__(self, n): self.left = n
    def readable(self): return True
    def readinto(self, b):
        n = min(len(b), self.left); b[:n] = bytes(n); self.left -= n; return n

class StoredGzip(io.RawIOBase):
    """A gzip member of `n` zeros in stored (level 0) deflate blocks."""
    def __init__(self, n):
        self.z = zlib.compressobj(0, zlib.DEFLATED, 31)
        self.left, self.buf, self.done = n, b"", False
    def readable(self): return True
    def readinto(self, b):
        while len(self.buf) < len(b) and not self.done:
            if self.left:
                k = min(self.left, len(chunk)); self.left -= k
                self.buf += self.z.compress(chunk[:k])
            else:
                self.buf += self.z.flush(); self.done = True
        n = min(len(b), len(self.buf)); b[:n] = self.buf[:n]; self.buf = self.buf[n:]; return n

def stored_len(n):
    z = zlib.compressobj(0, zlib.DEFLATED, 31); total = 0
    while n:
        k = min(n, len(chunk)); n -= k; total += len(z.compress(chunk[:k]))
    return total + len(z.flush())

def write(name, entries):
    with gzip.open(f"{work}/{name}", "wb", compresslevel=1) as gz, \
         tarfile.open(fileobj=gz, mode="w|") as tar:
        for path, n, src in entries:
            info = tarfile.TarInfo(path); info.size = n
            tar.addfile(info, io.BufferedReader(src, 1 << 20))

write("member.tgz", [("packages/bomb.tgz", size, Zeros(size))])
write("spread.tgz", [(f"junk/{i}", 64 << 20, Zeros(64 << 20)) for i in range(size >> 26)])
write("stored.tgz", [("packages/bomb.tgz", stored_len(size), StoredGzip(size))])
PY

printf '%-8s %-10s %8s %10s %9s  %s\n' shape limit size peak_rss wall first_error_line
for shape in member spread stored; do
    tgz="$work/$shape.tgz"
    for limit in default 1G; do
        state="$work/state-$shape-$limit"
        env=()
        [ "$limit" = default ] || env=(BOSUN_MAX_ARCHIVE_SIZE="$limit")
        set +e
        env "${env[@]}" /usr/bin/time -v "$bosun" --state-dir "$state" upload-release "$tgz" \
            >"$work/out" 2>"$work/err"
        set -e
        rss=$(awk -F: '/Maximum resident set size/ {gsub(/ /,"",$2); print $2}' "$work/err")
        wall=$(awk '/Elapsed \(wall clock\)/ {print $NF}' "$work/err")
        msg=$(grep -m1 '^Error' "$work/err" | cut -c1-120)
        printf '%-8s %-10s %7sM %9sM %9s  %s\n' "$shape" "$limit" \
            "$(( $(stat -c %s "$tgz") >> 20 ))" "$(( rss / 1024 ))" "$wall" "$msg"
    done
done
