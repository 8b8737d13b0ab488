#!/usr/bin/env bash
# Run the API, a Celery worker and beat together; Ctrl-C stops all three.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=.venv/bin/python
CELERY=.venv/bin/celery
HOST=${DIS_HOST:-127.0.0.1}
PORT=${DIS_PORT:-8000}
export LOG_FORMAT=${LOG_FORMAT:-console}

pids=()
stop() {
  trap - INT TERM EXIT
  echo "stopping (api, worker, beat)..."
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null; done
  echo "stopped"
  exit 0
}
trap stop INT TERM EXIT

$CELERY -A config worker -Q control,io,cpu --concurrency "${DIS_WORKER_CONCURRENCY:-2}" \
  --loglevel INFO --without-mingle --without-gossip &
pids+=($!)
$CELERY -A config beat --loglevel INFO --pidfile= &
pids+=($!)
$PY manage.py runserver "$HOST:$PORT" --noreload &
pids+=($!)

# The example runs once when the worker is up.
( sleep "${DIS_EXAMPLE_DELAY:-8}"; $PY manage.py run_pipeline flights-example --wait ) &
pids+=($!)

cat <<TXT

  API       http://$HOST:$PORT/api/docs/
  Admin     http://$HOST:$PORT/admin/   (credentials above)
  Health    http://$HOST:$PORT/healthz
  Ctrl-C stops the API, the worker and beat.

TXT
wait -n "${pids[@]:0:3}"
stop
