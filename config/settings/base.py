"""Settings shared by every environment, read from the environment (django-environ).

Every secret also accepts `NAME_FILE`: the path of a file holding it (a mounted
Kubernetes secret).
"""

from __future__ import annotations

import os
from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parent.parent.parent
#: Local state of the zero-config mode (SQLite, broker folders, keys, staged batches).
LOCAL_DIR = Path(os.environ.get("DIS_LOCAL_DIR", BASE_DIR / ".local"))

env = environ.Env()


def env_secret(name: str, default: str | None = None) -> str | None:
    """Read secret `name` from the environment or from the file `NAME_FILE` names."""
    path = os.environ.get(f"{name}_FILE")
    if path:
        return Path(path).read_text().strip()
    return os.environ.get(name, default)


DEBUG = env.bool("DJANGO_DEBUG", default=False)
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["127.0.0.1", "localhost"])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "knox",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_celery_beat",
    "connectors",
    "transforms",
    "lineage",
    "integration",
]

MIDDLEWARE = [
    "config.middleware.CorrelationIdMiddleware",
    "config.middleware.DatabaseUnavailableMiddleware",
    "config.middleware.MetricsMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def database_from_env(default_url: str) -> dict:
    """The default database from `DATABASE_URL`, tuned per engine."""
    db = env.db_url("DATABASE_URL", default=default_url)
    if db["ENGINE"] == "django.db.backends.sqlite3":
        # WAL lets the API read while a worker writes; the busy timeout makes
        # writers wait for each other instead of failing with "database is locked".
        db["OPTIONS"] = {
            "timeout": 30,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    elif db["ENGINE"] == "django.db.backends.postgresql":
        # Django's backend with a health check that costs no round trip while
        # the connection is quiet (config/postgres/base.py).
        db["ENGINE"] = "config.postgres"
        db.setdefault("OPTIONS", {})
        db["CONN_HEALTH_CHECKS"] = True
        db["CONN_MAX_AGE"] = env.int("DATABASE_CONN_MAX_AGE", default=60)
    return db


DATABASES = {"default": database_from_env(f"sqlite:///{LOCAL_DIR / 'db.sqlite3'}")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

_VALIDATORS = "django.contrib.auth.password_validation"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": f"{_VALIDATORS}.{name}"}
    for name in (
        "UserAttributeSimilarityValidator",
        "MinimumLengthValidator",
        "CommonPasswordValidator",
        "NumericPasswordValidator",
    )
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = env.path("DJANGO_STATIC_ROOT", default=str(BASE_DIR / "var" / "static"))

# --- REST API -------------------------------------------------------------------
REST_FRAMEWORK = {
    # Token first: its WWW-Authenticate header turns an anonymous call into 401.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "config.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": [
        "config.renderers.JSONRenderer",  # DRF's, serialising with orjson
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
    "DEFAULT_PAGINATION_CLASS": "config.api.Pagination",
    "PAGE_SIZE": 50,
    "DEFAULT_FILTER_BACKENDS": [
        "config.api.FilterBackend",
        "rest_framework.filters.OrderingFilter",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "config.api.exception_handler",
    "DEFAULT_THROTTLE_CLASSES": [
        "config.throttling.UserRateThrottle",  # DRF's, without pickling its history
        "rest_framework.throttling.AnonRateThrottle",
    ],
    "DEFAULT_THROTTLE_RATES": {
        "user": env.str("API_THROTTLE_USER", default="100000/hour"),
        "anon": env.str("API_THROTTLE_ANON", default="600/hour"),
    },
}
REST_KNOX = {
    "TOKEN_TTL": __import__("datetime").timedelta(
        hours=env.int("API_TOKEN_TTL_HOURS", default=24 * 30)
    ),
    "AUTO_REFRESH": False,
}
#: A checked API token is remembered this long per process (0: never): a token
#: deleted (or its user deactivated) in another process keeps working that long
#: in a process that checked it (config/authentication.py, docs/operations.md).
API_TOKEN_CACHE_SECONDS = env.float("API_TOKEN_CACHE_SECONDS", default=5.0)
SPECTACULAR_SETTINGS = {
    "TITLE": "Data Integration Service API",
    "DESCRIPTION": "Job control for pipelines, runs and dead letters.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "config.api.metrics_schema",
    ],
    "ENUM_NAME_OVERRIDES": {
        "RunStateEnum": "integration.choices.RunState",
        "ChunkStateEnum": "integration.choices.ChunkState",
        "DeadLetterStateEnum": "integration.choices.DeadLetterState",
        "RunKindEnum": "integration.choices.RunKind",
        "NodeKindEnum": "integration.choices.NodeKind",
        "NodeStateEnum": "integration.choices.NodeState",
        "WorkflowRunStateEnum": "integration.choices.WorkflowRunState",
        "PreviewValuesEnum": "transforms.choices.PreviewValues",
        "DriftPolicyEnum": "integration.choices.DriftPolicy",
        "ProposalStateEnum": "integration.choices.ProposalState",
        "SchemaChangeKindEnum": "integration.choices.SchemaChangeKind",
    },
}

# --- Celery ---------------------------------------------------------------------
REDIS_URL = env.str("REDIS_URL", default="")
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="filesystem://")
if CELERY_BROKER_URL.startswith("redis://"):
    # kombu's Redis transport, reusing one client per channel (config/broker.py).
    CELERY_BROKER_TRANSPORT = "config.broker:Transport"
#: Longest hard time limit of any task; the broker's visibility timeout stays above it.
CELERY_TASK_TIME_LIMIT = env.int("CELERY_TASK_TIME_LIMIT", default=30 * 60)
CELERY_TASK_SOFT_TIME_LIMIT = max(
    int(CELERY_TASK_TIME_LIMIT * 0.9), CELERY_TASK_TIME_LIMIT - 60
)
_broker_dir = LOCAL_DIR / "broker"
CELERY_BROKER_TRANSPORT_OPTIONS = (
    {
        "data_folder_in": str(_broker_dir / "out"),
        "data_folder_out": str(_broker_dir / "out"),
        "processed_folder": str(_broker_dir / "processed"),
        "store_processed": False,
    }
    if CELERY_BROKER_URL.startswith("filesystem://")
    else {
        # Above every hard time limit: a message is redelivered only when its
        # worker is surely gone (a redelivery to a live attempt is fenced anyway).
        "visibility_timeout": env.int(
            "CELERY_VISIBILITY_TIMEOUT", default=CELERY_TASK_TIME_LIMIT * 2 + 600
        ),
        "unacked_restore_interval": env.int("CELERY_UNACKED_RESTORE_INTERVAL", 10),
        "unacked_restore_throttle": 1,
    }
)
#: A prefix for every key the broker writes, so that two deployments can share
#: one Redis database (kombu's `global_keyprefix`).
if _broker_prefix := env.str("CELERY_BROKER_KEY_PREFIX", default=""):
    CELERY_BROKER_TRANSPORT_OPTIONS["global_keyprefix"] = _broker_prefix
# Completion is driven by the database (ChunkRun rows), so no result backend.
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_BACKEND = None
# JSON only: messages carry ids and small JSON; pickle would run code on load.
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
# A message is acknowledged after its task finished, and given back when the
# worker process died under it: a killed worker loses nothing (tasks are
# idempotent and fenced, so running one twice is harmless).
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
# One message at a time per process: nothing waits unacknowledged behind a long
# task, and a crash holds back at most one message.
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# After a broker connection loss, unacknowledged messages are redelivered anyway:
# cancel the tasks still running them instead of letting two copies race (the
# fence would stop the stale one, but this saves the work). SIGTERM is a warm
# shutdown: running tasks finish within their time limits.
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_TASK_DEFAULT_QUEUE = "control"
CELERY_TASK_ROUTES = {
    "integration.plan_run": {"queue": "control"},
    "integration.finalize_run": {"queue": "control"},
    "integration.extract_chunk": {"queue": "io"},
    "integration.transform_chunk": {"queue": "cpu"},
    "integration.load_chunk": {"queue": "io"},
    "integration.process_chunk": {"queue": "cpu"},
}
CELERY_WORKER_QUEUES = "control,io,cpu"
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
#: Housekeeping on beat (installed into the database scheduler at beat start).
CELERY_BEAT_SCHEDULE = {
    "reconcile-runs": {
        "task": "integration.reconcile",
        "schedule": env.float("DIS_RECONCILE_INTERVAL_SECONDS", default=60.0),
    },
    "workflow-event-triggers": {
        "task": "integration.event_triggers",
        "schedule": env.float("DIS_EVENT_TRIGGER_INTERVAL_SECONDS", default=15.0),
    },
    "file-triggers": {
        "task": "integration.file_triggers",
        "schedule": env.float("DIS_FILE_TRIGGER_INTERVAL_SECONDS", default=15.0),
    },
    "purge-expired": {
        "task": "integration.purge",
        "schedule": env.float("DIS_PURGE_INTERVAL_SECONDS", default=3600.0),
    },
}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_ALWAYS_EAGER = False

# --- Data path ------------------------------------------------------------------
#: Where batches wait between the tasks of a chunk: Redis when REDIS_URL is set,
#: else a local folder (zero-config mode).
DIS_STAGING_URL = env.str(
    "DIS_STAGING_URL", default=REDIS_URL or f"file://{LOCAL_DIR / 'staging'}"
)
DIS_STAGING_TTL_SECONDS = env.int("DIS_STAGING_TTL_SECONDS", default=24 * 3600)
DIS_STAGING_PREFIX = env.str("DIS_STAGING_PREFIX", default="dis:stage")
DIS_DEFAULT_CHUNK_ROWS = env.int("DIS_DEFAULT_CHUNK_ROWS", default=50_000)
DIS_DEFAULT_WINDOW = env.int("DIS_DEFAULT_WINDOW", default=4)
#: Run a chunk's extract, transform and load in one task (`process_chunk`) when
#: its load waits for no other chunk; false: always the three-task chain, staging
#: the batch between the tasks.
DIS_FUSE_CHUNK_STEPS = env.bool("DIS_FUSE_CHUNK_STEPS", default=True)
#: A chunk whose task killed its worker this many times is quarantined.
DIS_MAX_CHUNK_CRASHES = env.int("DIS_MAX_CHUNK_CRASHES", default=3)
#: A chunk of a pipeline whose chunks load in order (deduplicate, unique rules) is
#: woken when the chunk before it commits; it also checks this often whether its
#: turn to load has come (a safety net for a lost wake-up message).
DIS_LOAD_TURN_POLL_SECONDS = env.float("DIS_LOAD_TURN_POLL_SECONDS", default=5.0)
#: The reconciler resends a chunk (or plan, or finalize) quiet for this long: above
#: the hard time limit, so a live attempt is never taken for a lost one.
DIS_RECONCILE_STALE_SECONDS = env.int(
    "DIS_RECONCILE_STALE_SECONDS", default=CELERY_TASK_TIME_LIMIT + 300
)
#: Retention (days). Dead-letter payloads can hold personal data.
DIS_RETENTION_RUNS_DAYS = env.int("DIS_RETENTION_RUNS_DAYS", default=90)
DIS_RETENTION_CHUNK_RUNS_DAYS = env.int("DIS_RETENTION_CHUNK_RUNS_DAYS", default=30)
DIS_RETENTION_DEAD_LETTERS_DAYS = env.int("DIS_RETENTION_DEAD_LETTERS_DAYS", default=30)
DIS_ENGINE_THREADS = env.int("DIS_ENGINE_THREADS", default=1)
DIS_ENGINE_MEMORY_LIMIT = env.str("DIS_ENGINE_MEMORY_LIMIT", default="1GB")
#: Private or link-local networks (CIDRs) that user-supplied URLs may reach anyway
#: (the SSRF guard denies them otherwise), e.g. "10.1.0.0/16,127.0.0.1/32".
DIS_ALLOWED_NETWORKS = env.list("DIS_ALLOWED_NETWORKS", default=[])
#: The same for database (postgres, mysql) and Kafka broker hosts: checked when such
#: a connector is saved (400 naming the field), tested or opened. Empty in
#: production: a private database needs its network listed, e.g. "10.20.0.0/16".
DIS_DATA_ALLOWED_NETWORKS = env.list("DIS_DATA_ALLOWED_NETWORKS", default=[])

# --- Secrets --------------------------------------------------------------------
#: Fernet keys, newest first (comma-separated). The first encrypts; all decrypt.
DIS_ENCRYPTION_KEYS = env_secret("DIS_ENCRYPTION_KEYS")
DIS_ENCRYPTION_KEYS_GENERATE = False
DIS_ENCRYPTION_KEYS_LOCAL_FILE = LOCAL_DIR / "encryption.keys"

SECRET_KEY = env_secret("DJANGO_SECRET_KEY") or ""
#: When set, `GET /metrics` requires it as a bearer token (config/middleware.py).
DIS_METRICS_TOKEN = env_secret("DIS_METRICS_TOKEN") or ""

# --- Logging --------------------------------------------------------------------
LOG_LEVEL = env.str("LOG_LEVEL", default="INFO")
LOG_FORMAT = env.str("LOG_FORMAT", default="json")
from config.logging import build_logging_config  # noqa: E402

LOGGING_CONFIG = "config.logging.configure"
LOGGING = build_logging_config(LOG_LEVEL, LOG_FORMAT)
