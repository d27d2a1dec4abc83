#!/usr/bin/env bash
# Render an audit report (advface audit ... --out DIR -> DIR/report.html) to a PNG with headless Chromium, to check
# that its plots and image grids show; a report.pdf (--pdf) is rendered by poppler's pdftoppm (first page).
# Developer tool, not needed by the tests.
#
#   scripts/screenshot_report.sh REPORT.html OUT.png [WIDTH] [HEIGHT]
#
# Needs Chromium (Debian: apt-get install -y chromium). The page is self-contained, so no network is used.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 REPORT.html OUT.png [WIDTH] [HEIGHT]" >&2
    exit 2
fi
report=$1
out=$2
width=${3:-1200}
height=${4:-6000}
if [ ! -f "$report" ]; then
    echo "$0: no such report: $report" >&2
    exit 2
fi
case "$report" in
*.pdf)  # report.pdf (advface audit --pdf): Chromium's headless mode shows no PDF, so poppler renders its pages
    if ! command -v pdftoppm >/dev/null 2>&1; then
        echo "$0: pdftoppm not found (Debian: apt-get install -y poppler-utils)" >&2
        exit 3
    fi
    pdftoppm -r 80 -png -singlefile "$report" "${out%.png}"
    echo "wrote ${out%.png}.png (first page)"
    exit 0
    ;;
esac
browser=""
for candidate in chromium chromium-browser google-chrome headless_shell; do
    if command -v "$candidate" >/dev/null 2>&1; then
        browser=$(command -v "$candidate")
        break
    fi
done
if [ -z "$browser" ]; then
    echo "$0: Chromium not found (Debian: apt-get install -y chromium)" >&2
    exit 3
fi
url="file://$(cd "$(dirname "$report")" && pwd)/$(basename "$report")"
out_abs="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="$profile" \
    --window-size="${width},${height}" --screenshot="$out_abs" "$url" >/dev/null 2>&1
if [ ! -s "$out_abs" ]; then
    echo "$0: Chromium wrote no screenshot" >&2
    exit 1
fi
echo "wrote $out_abs"
