#!/usr/bin/env bash
# Fetch Chromium's headless shell from the Debian archive into .browser/ for the review-page test, without
# root and without Playwright's CDN: `apt-get download` of chromium-headless-shell and of the libraries this
# machine lacks, unpacked with `dpkg -x`. tests/browser/chromium.py finds it there (or MOLEFLOW_CHROMIUM).
#
#   tests/browser/fetch_chromium.sh [DEST]      # default DEST: .browser (git-ignored); prints the executable
#
# Needs apt-get, apt-cache and dpkg (Debian/Ubuntu) and the package lists (`apt-get update`, run here when the
# lists lack the package and we are root). Exits 1 with a message when the browser cannot be had.
set -euo pipefail
dest="${1:-.browser}"
exe="$dest/root/usr/lib/chromium/chromium-headless-shell"
if [ -x "$exe" ] && [ -f "$dest/complete" ]; then
  echo "$exe"
  exit 0
fi
for tool in apt-get apt-cache dpkg dpkg-query dpkg-deb; do
  command -v "$tool" >/dev/null || { echo "fetch_chromium: $tool not found (not a Debian system)" >&2; exit 1; }
done
has_candidate() { [[ "$(apt-cache policy chromium-headless-shell 2>/dev/null)" == *"Candidate: "[0-9]* ]]; }
if ! has_candidate && [ "$(id -u)" = 0 ]; then
  apt-get update -qq >/dev/null 2>&1 || true
fi
has_candidate || { echo "fetch_chromium: no chromium-headless-shell in the apt lists (run apt-get update)" >&2; exit 1; }
rm -rf "$dest/debs" "$dest/root" "$dest/complete"
mkdir -p "$dest/debs" "$dest/root"
# the package and everything it needs, recursively, less what is installed here already
packages=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
  --no-replaces --no-enhances chromium-headless-shell | grep -E '^[a-z0-9]' | sort -u)
missing=()
for p in $packages; do
  [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing+=("$p")
done
cd "$dest/debs"
if ! apt-get download -qq "${missing[@]}" >/dev/null 2>&1; then
  for p in "${missing[@]}"; do apt-get download -qq "$p" >/dev/null 2>&1 || true; done  # skip virtual ones
fi
for deb in *.deb; do dpkg-deb -x "$deb" ../root; done
cd - >/dev/null
rm -rf "$dest/debs"
[ -x "$exe" ] || { echo "fetch_chromium: chromium-headless-shell was not unpacked" >&2; exit 1; }
touch "$dest/complete"
echo "$exe"
