#!/bin/sh
# One-shot set-up for the compose demo (runs in the receiver image before the API and the workers):
#  1. a model package in /models/current: a package shipped under /opt/aeic/shipped/<name>/, else a
#     tiny random-weight package (the pipeline runs end to end, the pictures are not meaningful);
#  2. a device token for the simulated edge sender in /secrets/edge-sim.token (created once).
# Both steps are idempotent, so `docker compose up` can run it every time.
set -eu

if [ ! -f /models/current/manifest.json ]; then
    shipped="$(find /opt/aeic/shipped -mindepth 2 -maxdepth 2 -name manifest.json 2>/dev/null | sort | head -n 1)"
    rm -rf /models/.incoming
    if [ -n "$shipped" ]; then
        echo "provision: using the shipped model package $(dirname "$shipped")"
        cp -r "$(dirname "$shipped")" /models/.incoming
    else
        echo "provision: WARNING no trained model package shipped; exporting a tiny random-weight demo package"
        python -c "from pathlib import Path; from aeic.codec.testing import make_tiny_package; make_tiny_package(Path('/models/.incoming'))"
    fi
    rm -rf /models/current
    mv /models/.incoming /models/current
fi

if [ ! -s /secrets/edge-sim.token ]; then
    aeic-receiver token create --device edge-sim > /secrets/.edge-sim.token
    chmod 0640 /secrets/.edge-sim.token
    mv /secrets/.edge-sim.token /secrets/edge-sim.token
fi
echo "provision: model $(python -c "import json; print(json.load(open('/models/current/manifest.json')).get('model_id', '?'))"), edge token ready"
