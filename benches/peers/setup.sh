#!/bin/sh
# Installs the peer queue used by benches/peers/graphile_drain.mjs into
# benches/peers/node_modules (not run by CI: the comparison is by hand).
set -eu
cd "$(dirname "$0")"
npm install --no-save --no-audit --no-fund --prefix . graphile-worker@0.17.3
