#!/usr/bin/env bash
# Get the Olinda scene without ../shared/data: from Debian's r-cran-stars and r-cran-sf packages.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="$here/olinda_brazil"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
if ! apt-get download r-cran-stars r-cran-sf >/dev/null 2>&1; then
  apt-get update -qq
  apt-get download r-cran-stars r-cran-sf
fi
for deb in r-cran-stars_*.deb r-cran-sf_*.deb; do dpkg-deb -x "$deb" x; done
lib=x/usr/lib/R/site-library
mkdir -p "$dest.partial"
cp "$lib/stars/tif/L7_ETMs.tif" "$dest.partial/"
cp "$lib"/sf/shape/olinda1.* "$dest.partial/"
rm -rf "$dest" && mv "$dest.partial" "$dest"
echo "olinda_brazil: from Debian packages r-cran-stars and r-cran-sf -> $dest"
