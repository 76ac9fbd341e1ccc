"""Conveyor settings, read from the environment (see README "Configuration")."""

from __future__ import annotations

import secrets
import sys
from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from config import embedded_db
from config.env import env_bool, env_float, env_int, env_list, env_str, secret_in_file
from config.own_apps import parse_apps

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = Path(env_str("CONVEYOR_DATA_DIR") or BASE_DIR / ".data")


def _local_secret_key() -> str:
    """A key generated once per checkout and kept under .data/ (never committed)."""
    return secret_in_file(DATA_DIR / "secret_key", lambda: secrets.token_urlsafe(50))


DEBUG = env_bool("DEBUG", True)
SECRET_KEY = env_str("SECRET_KEY") or _local_secret_key()
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "django_q",
    "django_htmx",
    "template_partials",
    # Serves the API docs' Swagger UI from static files instead of a CDN.
    "ninja",
    "jobs",
    "dashboard",
]
# Your own apps, after Conveyor's (README "Your own jobs"): migrated like
# Conveyor's, and their `tasks` modules imported at every start (jobs/apps.py).
CONVEYOR_APPS = parse_apps(env_str("CONVEYOR_APPS"), [*INSTALLED_APPS, "daphne", "axes"])
INSTALLED_APPS += CONVEYOR_APPS
# Daphne's app only makes `runserver` serve ASGI. Loading it installs Twisted's
# reactor, 0.4 s of the start of every other command and of every worker
# cluster; Daphne itself (`daphne config.asgi:application`, `manage.py up`)
# does not need it.
if "runserver" in sys.argv[1:2]:
    INSTALLED_APPS.insert(0, "daphne")

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
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

# --- Database ---------------------------------------------------------------
# DATABASE_DIRECT_URL: see "Behind PgBouncer" below.
DATABASE_DIRECT_URL = env_str("DATABASE_DIRECT_URL")
if DATABASE_DIRECT_URL and not env_str("DATABASE_URL"):
    raise ImproperlyConfigured("DATABASE_DIRECT_URL needs DATABASE_URL (the pooler's URL) set too")
# With DATABASE_URL, use that server; without it, start the embedded one.
DATABASE_URL = env_str("DATABASE_URL") or embedded_db.database_url(DATA_DIR / "pg", "conveyor")
EMBEDDED_POSTGRES = not env_str("DATABASE_URL")
DATABASES = {
    "default": dj_database_url.parse(
        DATABASE_URL,
        # Django-Q2's broker calls close_old_connections() around every fetch
        # and acknowledge; with 0 each of those opens a new connection.
        conn_max_age=env_int("CONN_MAX_AGE", 600, minimum=0),
        # Off by default: a worker would pay a round trip per task for it. A
        # connection broken by a Postgres restart fails its task, which is not
        # acknowledged and so is delivered again on a fresh connection.
        conn_health_checks=env_bool("CONN_HEALTH_CHECKS", False),
    )
}
DATABASES["default"]["TEST"] = {"NAME": env_str("TEST_DATABASE_NAME") or None}
# Under ASGI, Django runs each request's synchronous code on a thread of its
# own, so without a pool every request opens a new Postgres connection. Daphne
# runs with CONVEYOR_DB_POOL=1 (`manage.py up` sets it); workers fork, which a
# pool does not survive, and keep their one persistent connection instead.
if env_bool("CONVEYOR_DB_POOL", False):
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": env_int("CONVEYOR_DB_POOL_MIN", 2, minimum=0),
        "max_size": env_int("CONVEYOR_DB_POOL_MAX", 20, minimum=1),
    }

# --- Behind PgBouncer (transaction pooling) ----------------------------------
# DATABASE_DIRECT_URL reaches Postgres itself; when it is set, DATABASE_URL is
# taken for a pooler in transaction mode, where nothing may outlive a
# transaction. Then (and only then: the direct path is untouched):
# - LISTEN connections (the broker's wake-ups, the event hub) use the direct
#   URL (jobs/djangoq/broker.py `listen_params`);
# - psycopg prepares nothing (prepare_threshold None) and the job path's
#   prepared statements are off (CONVEYOR["PREPARED_STATEMENTS"], jobs/db/sql.py);
# - Django's server-side cursors (QuerySet.iterator()) are off;
# - workers keep the server's synchronous_commit rather than a session SET
#   (jobs/db/durability.py).
# Advisory locks are all transaction-level already (pg_try_advisory_xact_lock).
DATABASE_POOLED = bool(DATABASE_DIRECT_URL)
if DATABASE_POOLED:
    DATABASES["default"]["DISABLE_SERVER_SIDE_CURSORS"] = True
    DATABASES["default"].setdefault("OPTIONS", {})["prepare_threshold"] = None
    # Host, port, user, password, name and OPTIONS of the direct connection.
    DATABASE_DIRECT = dj_database_url.parse(DATABASE_DIRECT_URL)

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# A cache every process can read: cluster stats, rate-limit counters.
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.db.DatabaseCache",
        "LOCATION": "conveyor_cache",
    }
}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = DATA_DIR / "staticfiles"

# --- Channels ---------------------------------------------------------------
# Live events travel through Postgres LISTEN/NOTIFY; the channel layer is only
# ever process-local.
CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# --- Live dashboard (dashboard/live/hub.py) ---------------------------------------
CONVEYOR_LIVE = {
    # Updates a stream may fall behind by before it is closed (its client
    # reconnects and replays from the event log).
    "SUBSCRIBER_QUEUE_SIZE": env_int("CONVEYOR_SSE_QUEUE_SIZE", 1000, minimum=10),
    "KEEPALIVE_SECONDS": env_int("CONVEYOR_SSE_KEEPALIVE_SECONDS", 15, minimum=1),
    # Whether this process takes part in publishing `queue.stats` events (at
    # most once a second across all processes).
    "PUBLISH_QUEUE_STATS": env_bool("CONVEYOR_PUBLISH_QUEUE_STATS", True),
    "STATS_INTERVAL_SECONDS": 1.0,
    # How often each process re-checks, in one batch, that the keys, sessions
    # and users its open streams were let in with are still valid.
    "ACCESS_CHECK_SECONDS": env_float("CONVEYOR_SSE_ACCESS_CHECK_SECONDS", 1.0, minimum=0.1),
}
# The overview warns when a transaction on the database has been open this
# long: Postgres cannot remove dead rows while it is, and claims slow down.
CONVEYOR_HORIZON_WARNING_SECONDS = env_int("CONVEYOR_HORIZON_WARNING_SECONDS", 300, minimum=1)

# --- Security (secure defaults whenever DEBUG is off) -----------------------
# DEBUG=1 (the default, what `make run` and the tests use) serves plain HTTP on
# loopback. DEBUG=0 is production: HTTPS only, HSTS, cookies marked Secure.
if not DEBUG:
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000, minimum=0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", True)
    SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", True)
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
# Trusting X-Forwarded-Proto is only safe when a proxy always sets it (and
# strips what clients send): a client talking to Daphne directly could
# otherwise claim HTTPS. So it is opt-in, in either spelling.
_PROXY_SSL_HEADER = env_str("SECURE_PROXY_SSL_HEADER")
# Also decides whether X-Forwarded-For names the client (config/middleware.py
# `ProxyHeaders`): Daphne runs without --proxy-headers, which believed anyone.
CONVEYOR_BEHIND_PROXY = env_bool("CONVEYOR_BEHIND_PROXY", False)
if _PROXY_SSL_HEADER:
    _header, _, _value = _PROXY_SSL_HEADER.partition(",")
    if not _header.strip() or not _value.strip():
        raise ImproperlyConfigured(
            f"SECURE_PROXY_SSL_HEADER={_PROXY_SSL_HEADER!r}: use 'HTTP_X_FORWARDED_PROTO,https' (header, value)"
        )
    SECURE_PROXY_SSL_HEADER = (_header.strip(), _value.strip())
elif CONVEYOR_BEHIND_PROXY:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_HTTPONLY = True
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"

# Login rate limiting (django-axes): failures are counted per username and
# client address in the database, so every Daphne process sees the same
# count. After AXES_FAILURE_LIMIT failures that pair is locked out for
# AXES_COOLOFF_MINUTES; a success resets its count.
AXES_FAILURE_LIMIT = env_int("AXES_FAILURE_LIMIT", 5, minimum=1)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("AXES_COOLOFF_MINUTES", 15, minimum=1))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_CALLABLE = "config.login.locked_out"
AXES_VERBOSE = False
# The client address is REMOTE_ADDR: with CONVEYOR_BEHIND_PROXY=1 it is the
# one the proxy put in X-Forwarded-For, otherwise the connection's peer.
INSTALLED_APPS.append("axes")
# Last, as django-axes asks: it answers a locked-out login with its template.
MIDDLEWARE.append("axes.middleware.AxesMiddleware")
AUTHENTICATION_BACKENDS = [
    # First: it refuses a locked-out username+address before a password is checked.
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]

# --- Jobs engine ------------------------------------------------------------
CONVEYOR = {
    # A running attempt owns its job for this long; the worker renews it at a
    # third of the period. A worker that dies stops renewing and, once the
    # lease has expired, its attempt is recorded as lost and the job retried.
    "LEASE_SECONDS": env_int("CONVEYOR_LEASE_SECONDS", 30, minimum=2),
    "RETENTION_DAYS": env_int("CONVEYOR_RETENTION_DAYS", 14, minimum=1),
    # Dead jobs (the dead-letter queue) are kept longer: they may still be retried.
    "DEAD_RETENTION_DAYS": env_int("CONVEYOR_DEAD_RETENTION_DAYS", 90, minimum=1),
    "MAX_PAYLOAD_BYTES": 256 * 1024,
    "DEFAULT_QUEUE": "default",
    # Async (I/O-bound) jobs one worker process runs at once (jobs/worker/lane.py).
    "LANE_CAPACITY": env_int("CONVEYOR_LANE_CAPACITY", 256, minimum=1),
    # At most this many more ready async jobs a delivery claims for its lane's
    # free places, in one statement (jobs/worker/claims.py `fill_lane`); 0: none.
    "LANE_FILL": env_int("CONVEYOR_LANE_FILL", 32, minimum=0),
    # After its job, a Django-Q2 delivery runs more ready jobs of sync kinds
    # for up to this many seconds (jobs/worker/chain.py `run_chain`); 0: none.
    "CHAIN_SECONDS": env_float("CONVEYOR_CHAIN_SECONDS", 0.5, minimum=0),
    # At most this many ready jobs a chain claims in one statement, while its
    # jobs run fast enough that a claim's jobs are all done within about 20 ms
    # (jobs/worker/chain.py `_Chain`); 1: one at a time.
    "CHAIN_BATCH": env_int("CONVEYOR_CHAIN_BATCH", 32, minimum=1),
    # POST /api/v1/jobs with an API key is answered ahead of Django's request
    # cycle (jobs/api/intake.py); off, every request goes through Django's view.
    "INTAKE": env_bool("CONVEYOR_INTAKE", True),
    # Threads one Daphne process runs Django's views on (config/server/handler.py).
    "HTTP_THREADS": env_int("CONVEYOR_HTTP_THREADS", 8, minimum=1),
    # The statements of a job's path run as server-side prepared statements
    # (jobs/db/sql.py); off, they go through Django's cursor. Always off behind
    # a transaction pooler (DATABASE_DIRECT_URL set).
    "PREPARED_STATEMENTS": env_bool("CONVEYOR_PREPARED_STATEMENTS", True) and not DATABASE_POOLED,
}

# Seconds before Django-Q2 hands an unacknowledged broker row out again. The
# runner uses that redelivery as its watchdog: it is how a job whose worker
# was killed is noticed (see jobs/worker/runner.py), so keep it short.
_VISIBILITY = env_int("CONVEYOR_VISIBILITY_TIMEOUT", 60, minimum=2)

# "postgres": jobs.djangoq.broker.PostgresBroker (SKIP LOCKED batches, LISTEN/NOTIFY
# wake-ups); "orm": Django-Q2's stock ORM broker, kept for comparison.
CONVEYOR_BROKER = env_str("CONVEYOR_BROKER", "postgres")
if CONVEYOR_BROKER not in ("postgres", "orm"):
    raise ImproperlyConfigured(f"CONVEYOR_BROKER={CONVEYOR_BROKER!r}: use 'postgres' or 'orm'")

Q_CLUSTER = {
    "name": "conveyor",
    # A cluster serves one queue: its name is the queue's (Q_CLUSTER_NAME=llm
    # manage.py qcluster serves the "llm" queue). Broker rows carry the queue
    # as their key.
    "cluster_name": "default",
    "ALT_CLUSTERS": {},
    "orm": "default",
    "workers": env_int("CONVEYOR_WORKERS", 2, minimum=1),
    # Applies to tasks without their own timeout (schedules); job tasks carry
    # their handler's timeout.
    "timeout": _VISIBILITY - 1,
    "retry": _VISIBILITY,
    "bulk": env_int("CONVEYOR_BROKER_BULK", 4, minimum=1),
    "poll": 0.2,
    "catch_up": False,
    "save_limit": -1,  # the Job row is the record; do not copy successes into django_q_task
    # A task only fails when the runner itself could not reach the database
    # (handler errors are the runner's business): leave it unacknowledged so
    # it is delivered again, for as long as it takes.
    "ack_failures": False,
    "max_attempts": 0,
    "recycle": 1000,
    "label": "Django-Q2",
}
if CONVEYOR_BROKER == "postgres":
    Q_CLUSTER["broker_class"] = "jobs.djangoq.broker.PostgresBroker"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {
        "django_q": {"level": env_str("DJANGO_Q_LOG_LEVEL", "WARNING")},
        "embedded_postgres": {"level": "WARNING"},
    },
}

# --- The simulated LLM provider (config/simulator/simulated.py) -----------------------
# Its /load endpoint and X-Sim-* failure-injection headers: unset, they work
# only with DEBUG on while it is a configured provider; 1 or 0 decides outright.
CONVEYOR_SIMULATOR_CONTROLS = (
    env_bool("CONVEYOR_SIMULATOR_CONTROLS", False) if (env_str("CONVEYOR_SIMULATOR_CONTROLS") or "").strip() else None
)

# --- Webhooks (jobs/webhooks/, jobs/engine/ssrf.py) ---------------------------------------------


def _env_scale(name: str, default: float) -> float:
    raw = env_str(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a number") from None
    if not 0 < value <= 1000:
        raise ImproperlyConfigured(f"{name}={value} must be above 0 and at most 1000")
    return value


CONVEYOR_WEBHOOKS = {
    # Deliver to loopback, private and link-local addresses too (development,
    # tests). Multicast, unspecified and cloud-metadata addresses stay refused.
    "ALLOW_PRIVATE": env_bool("CONVEYOR_WEBHOOK_ALLOW_PRIVATE", False),
    # Multiplies the delivery retry schedule (5 s, 5 min, 30 min, 2 h, 5 h,
    # 10 h, 10 h); tests shrink it.
    "BACKOFF_SCALE": _env_scale("CONVEYOR_WEBHOOK_BACKOFF_SCALE", 1.0),
}

# --- Operations: logs, metrics, readiness (config/logs.py, jobs/metrics.py, config/health.py)

# "json": one JSON object per line; "plain": text. Either way, lines a job
# produces carry its job_id, kind, attempt and queue, and lines a request
# causes carry its request_id.
LOG_FORMAT = env_str("LOG_FORMAT", "plain")
if LOG_FORMAT not in ("plain", "json"):
    raise ImproperlyConfigured(f"LOG_FORMAT={LOG_FORMAT!r}: use 'plain' or 'json'")
LOGGING["filters"] = {"context": {"()": "config.logs.ContextFilter"}}
LOGGING["formatters"] = {"plain": {"()": "config.logs.PlainFormatter"}, "json": {"()": "config.logs.JsonFormatter"}}
LOGGING["handlers"]["console"].update(formatter=LOG_FORMAT, filters=["context"])
# Django-Q2 logs as "django-q"; the "django_q" entry above never applied.
LOGGING["loggers"]["django-q"] = {"level": env_str("DJANGO_Q_LOG_LEVEL", "WARNING")}
# Without handlers of its own: Django's default console handler (DEBUG only)
# would print each django.* line a second time, unformatted.
LOGGING["loggers"]["django"] = {"level": "INFO"}

MIDDLEWARE.insert(0, "config.middleware.RequestIdMiddleware")

# GET /metrics wants `Authorization: Bearer <token>` when set (or METRICS_TOKEN_FILE).
METRICS_TOKEN = env_str("METRICS_TOKEN") or None
# The queues /readyz expects a live worker cluster for.
CONVEYOR_QUEUES = env_list("CONVEYOR_QUEUES", ["default", "llm", "webhooks"])
# Load balancers and Prometheus probe over plain HTTP, inside the network.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
# django-axes logs each lockout at WARNING; its INFO lines (one per sign-in) are noise.
LOGGING["loggers"]["axes"] = {"level": "WARNING"}
# httpx logs every request at INFO: one line per LLM call or webhook attempt.
LOGGING["loggers"]["httpx"] = {"level": env_str("HTTPX_LOG_LEVEL", "WARNING")}
