#!/usr/bin/env bash
# The image's entrypoint: one role per container, the same commands `make run`
# and the tests use. The Helm chart (charts/dis) and docker/compose.yaml pass the
# role as the first argument; anything after it goes to the role's command.
#
#   api                   gunicorn config.wsgi (gunicorn.conf.py: WEB_CONCURRENCY
#                         workers, gc.freeze) on 0.0.0.0:$PORT (default 8000)
#   worker                celery worker on $DIS_WORKER_QUEUES (control,io,cpu) with
#                         $DIS_WORKER_CONCURRENCY (2) pool processes; its own
#                         metrics on $DIS_WORKER_METRICS_PORT when set
#   beat                  celery beat with django-celery-beat's DatabaseScheduler
#                         (the schedules operators edit in the admin); run ONE
#   migrate               manage.py migrate
#   wait-for-migrations   exits 0 once the database has every migration of this
#                         image; until then retries every 5 s (DIS_MIGRATIONS_POLL_SECONDS),
#                         for at most $DIS_MIGRATIONS_TIMEOUT seconds (300)
#   manage ARGS           manage.py ARGS (create_api_token, rotate_encryption_keys...)
#   anything else         run as given (a shell, python, ...)
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."

role=${1:-api}
[ $# -gt 0 ] && shift

case "$role" in
  api)
    # gunicorn's worker heartbeat files: in memory when the container has it
    # (a disk-backed /tmp can stall the heartbeat and get workers killed).
    tmp=()
    if [ -d /dev/shm ] && [ -w /dev/shm ]; then tmp=(--worker-tmp-dir /dev/shm); fi
    exec gunicorn config.wsgi --bind "0.0.0.0:${PORT:-8000}" "${tmp[@]}" "$@"
    ;;
  worker)
    exec celery -A config worker \
      -Q "${DIS_WORKER_QUEUES:-control,io,cpu}" \
      --concurrency "${DIS_WORKER_CONCURRENCY:-2}" \
      --loglevel "${LOG_LEVEL:-INFO}" \
      --without-mingle --without-gossip "$@"
    ;;
  beat)
    # No schedule file: the DatabaseScheduler keeps its state in the database.
    exec celery -A config beat --loglevel "${LOG_LEVEL:-INFO}" --pidfile= "$@"
    ;;
  migrate)
    exec python manage.py migrate --no-input "$@"
    ;;
  wait-for-migrations)
    deadline=$((SECONDS + ${DIS_MIGRATIONS_TIMEOUT:-300}))
    until python manage.py migrate --check >/dev/null 2>&1; do
      if [ "$SECONDS" -ge "$deadline" ]; then
        echo "wait-for-migrations: the database still lacks migrations after" \
          "${DIS_MIGRATIONS_TIMEOUT:-300} s (has the migrate job run?)" >&2
        python manage.py showmigrations --plan 2>&1 | grep -v '\[X\]' | tail -20 >&2 || true
        exit 1
      fi
      sleep "${DIS_MIGRATIONS_POLL_SECONDS:-5}"
    done
    echo "wait-for-migrations: the database is up to date"
    ;;
  manage)
    exec python manage.py "$@"
    ;;
  *)
    exec "$role" "$@"
    ;;
esac
