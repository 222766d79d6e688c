#!/bin/sh
# Simulated edge device for the compose demo: compresses the bundled sample photographs with the
# sender codec and uploads one every EDGE_INTERVAL_S seconds, forever. Failed uploads stay in the
# spool and are retried by the next `aeic-send send` (the sender's own durability, nothing extra).
set -eu
AEIC_TOKEN="$(cat "${AEIC_TOKEN_FILE:-/secrets/edge-sim.token}")"
export AEIC_TOKEN
interval="${EDGE_INTERVAL_S:-15}"
rate="${EDGE_RATE:-0}"
while :; do
    for photo in /opt/aeic/samples/*; do
        aeic-send send --rate "$rate" --spool /var/lib/aeic-sender/spool "$photo" \
            || echo "edge-sim: $photo not delivered yet (kept in the spool)"
        sleep "$interval"
    done
done
