#!/usr/bin/env bash
# The container without Docker: a Bento's own requirements in a clean virtualenv, serving the Bento's
# own models from an empty BentoML home, as its image's entrypoint would (`bentoml serve $BENTO_PATH`).
#
#   deploy/bento_smoke.sh glowing-cpu:latest        # about 2 min (most of it pip); needs the package registry
#
# Prints the venv size, the seconds until /readyz, /score and /info answers; exit 1 on any failure.
# Measured on 2 vCPU AMD EPYC with the cpu-preset models: 3 min in all (bentoml export 1 min, pip 1.5 min),
# venv 290 MB without torch, ready after about 4 s, /score and /info answer.
# The GPU Bento installs (onnxruntime-gpu + CUDA wheels, GBs) but needs a GPU to serve: not run here.
set -euo pipefail
BENTO=${1:?usage: deploy/bento_smoke.sh BENTO_TAG (e.g. glowing-cpu:latest)}
PY=${PYTHON:-python3}
BENTOML=${BENTOML:-.venv/bin/bentoml}
WORK=$(mktemp -d /tmp/glowing-bento-smoke-XXXXXX)
PORT=${PORT:-$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
PID=
cleanup() { if [ -n "$PID" ]; then kill -- -"$PID" 2>/dev/null || true; fi; rm -rf "$WORK"; }
trap cleanup EXIT

"$BENTOML" export "$BENTO" "$WORK/bento.bento" >/dev/null
mkdir "$WORK/bento" "$WORK/home" && tar xf "$WORK/bento.bento" -C "$WORK/bento"
"$PY" -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install --quiet -r "$WORK/bento/env/python/requirements.txt" 2>&1 | grep -v "^WARNING: Location" || true
echo "venv: $(du -sh "$WORK/venv" | cut -f1), torch: $("$WORK/venv/bin/python" -c 'import importlib.util as u; print("yes" if u.find_spec("torch") else "no")')"

# The Bento's environment (bento.yaml envs), nothing from this shell but PATH.
mapfile -t ENVS < <("$WORK/venv/bin/python" -c 'import sys, yaml; [print(e["name"] + "=" + str(e["value"])) for e in yaml.safe_load(open(sys.argv[1]))["envs"]]' "$WORK/bento/bento.yaml")
cd "$WORK/home"
env -i PATH="$WORK/venv/bin:/usr/bin:/bin" HOME="$WORK/home" BENTOML_HOME="$WORK/home" BENTOML_DO_NOT_TRACK=True \
  "${ENVS[@]}" setsid "$WORK/venv/bin/bentoml" serve "$WORK/bento" --host 127.0.0.1 --port "$PORT" >"$WORK/serve.log" 2>&1 &
PID=$!
for i in $(seq 180); do
  curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break
  kill -0 "$PID" 2>/dev/null || { tail -20 "$WORK/serve.log"; exit 1; }
  sleep 1
done
curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null || { echo "not ready after 180 s"; tail -20 "$WORK/serve.log"; exit 1; }
echo "ready after about $i s"
curl -sf "http://127.0.0.1:$PORT/score" -H 'Content-Type: application/json' -d '{"texts": ["Great film.", "Awful."]}'; echo
curl -sf "http://127.0.0.1:$PORT/info" | "$WORK/venv/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["service"])'
