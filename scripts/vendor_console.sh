#!/usr/bin/env bash
# Refresh the web console's vendored front-end libraries (ray_app/console/static/vendor/) from npm.
# They are committed (about 70 KB): the console needs no network and no build step at run time.
# Bump a version here, run this, check `git diff`, run the browser tests (tests/e2e/test_console.py).
set -euo pipefail
PREACT=11.2.0 HTM=3.1.1 UPLOT=1.6.32
out="$(cd "$(dirname "$0")/.." && pwd)/ray_app/console/static/vendor"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
cd "$work"
npm pack --silent "preact@$PREACT" "htm@$HTM" "uplot@$UPLOT" >/dev/null
for f in *.tgz; do mkdir "${f%.tgz}"; tar xzf "$f" -C "${f%.tgz}"; done
mkdir -p "$out"
cp "preact-$PREACT/package/dist/preact.mjs" "$out/preact.mjs"
cp "preact-$PREACT/package/hooks/dist/hooks.mjs" "$out/preact-hooks.mjs"
cp "htm-$HTM/package/dist/htm.mjs" "$out/htm.mjs"
cp "uplot-$UPLOT/package/dist/uPlot.iife.min.js" "uplot-$UPLOT/package/dist/uPlot.min.css" "$out/"
sed -i '/^\/\/# sourceMappingURL=/d' "$out"/*.mjs  # no source maps shipped: nothing to 404 on
# relative imports, so the page needs no inline import map (the console's CSP allows no inline script)
sed -i 's/from"preact"/from".\/preact.mjs"/g' "$out/preact-hooks.mjs"
{ echo "preact $PREACT (MIT)"; cat "preact-$PREACT/package/LICENSE"; echo
  echo "htm $HTM (Apache-2.0)"; cat "htm-$HTM/package/LICENSE"; echo
  echo "uPlot $UPLOT (MIT)"; cat "uplot-$UPLOT/package/LICENSE"; } > "$out/LICENSES.txt"
(cd "$out" && sha256sum ./*.mjs ./*.js ./*.css)
