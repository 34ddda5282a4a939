"""The study storage: an SQLAlchemy database (an SQLite file by default, PostgreSQL for workers on several machines),
opened the same way by every worker whichever driver is installed, however many workers start at once, and however
the last one died.
"""

from __future__ import annotations

import importlib
import random
import time
import warnings
from pathlib import Path
from typing import Any

from ..errors import ConfigError

# How often a worker marks its running trial alive. A trial unmarked for twice that (its worker was killed, its
# machine lost) is failed by the next worker that starts a trial, and its parameters run again.
HEARTBEAT_SECONDS = 60
# A dead worker's trial runs again at most this often: a setting that kills its worker every time (the kernel's
# out-of-memory killer) must not stall the study.
MAX_RETRIES = 2
# Workers started together on an empty database all create Optuna's tables, and all but one fail on the duplicates;
# they try again after a jittered pause that doubles each time (under 10 s in all).
OPEN_ATTEMPTS = 8
FIRST_PAUSE_SECONDS = 0.05
MAX_PAUSE_SECONDS = 2.0
# SQLAlchemy's default driver for a bare postgresql:// differs by version (psycopg2 in 2.0, psycopg 3 in 2.1), so
# the URL is given whichever of them is installed, the extra's psycopg 3 first.
POSTGRES_DRIVERS = ("psycopg", "psycopg2")
# What to install for it, or for a driver module SQLAlchemy could not import (the extra `postgres` brings psycopg).
POSTGRES_INSTALL = "pip install 'psycopg[binary]'"
DRIVER_PACKAGES = {"psycopg": "'psycopg[binary]'", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient",
                   "pymysql": "PyMySQL"}


def masked_url(url: str) -> str:
    """`url` with its password masked, for messages and summaries."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def open_storage(url: str, heartbeat: int = HEARTBEAT_SECONDS) -> Any:
    """The Optuna storage at the SQLAlchemy `url`, its tables created if it has none, with a heartbeat every
    `heartbeat` seconds while a trial runs and a retry of trials whose heartbeat stopped. Bad URLs, drivers,
    credentials and databases raise one ConfigError naming the URL, its password masked."""
    import optuna

    shown = masked_url(url)
    if heartbeat < 1:
        raise ConfigError(f"--heartbeat must be >= 1 second, got {heartbeat}")
    url = _with_driver(url, shown)
    if url.startswith("sqlite:///"):
        folder = Path(url[len("sqlite:///"):]).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--storage {shown}: cannot make its folder {folder} ({exc.strerror})") from None
    # SQLite serialises writers: a generous lock timeout lets several workers share one file. An unreachable
    # PostgreSQL host fails after 10 s rather than the system's TCP timeout of minutes.
    connect_args = ({"timeout": 60} if url.startswith("sqlite") else
                    {"connect_timeout": 10} if url.startswith("postgresql") else {})
    attempt = 0
    while True:
        try:
            with warnings.catch_warnings():
                # The heartbeat is marked experimental; the warning would repeat in every worker.
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, engine_kwargs={"connect_args": connect_args}, heartbeat_interval=heartbeat,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(MAX_RETRIES))
        except Exception as exc:  # SQLAlchemy and the drivers raise their own hierarchies
            attempt += 1
            if attempt == OPEN_ATTEMPTS or not _lost_creation_race(exc):
                raise ConfigError(f"--storage {shown}: {_problem(exc)}") from None
            time.sleep(random.uniform(0, min(MAX_PAUSE_SECONDS, FIRST_PAUSE_SECONDS * 2 ** attempt)))


def _with_driver(url: str, shown: str) -> str:
    """`url` with the installed PostgreSQL driver named, if it is a bare postgresql:// URL."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"--storage {shown}: not an SQLAlchemy URL (expected e.g. sqlite:///study.db or "
                          f"postgresql://user:password@host:5432/database)") from None
    if parsed.drivername != "postgresql":
        return url
    for driver in POSTGRES_DRIVERS:
        try:
            importlib.import_module(driver)
        except ImportError:
            continue
        return parsed.set(drivername=f"postgresql+{driver}").render_as_string(hide_password=False)
    raise ConfigError(f"--storage {shown}: no PostgreSQL driver is installed ({POSTGRES_INSTALL})")


def _lost_creation_race(exc: BaseException) -> bool:
    """Whether `exc` is what a worker gets when another one created the same table, type or row an instant
    earlier: a unique violation, an 'already exists', or a deadlock between the two creations."""
    from sqlalchemy.exc import DBAPIError, IntegrityError

    if isinstance(exc, IntegrityError):
        return True
    return isinstance(exc, DBAPIError) and any(s in str(exc.orig).lower() for s in ("already exists", "deadlock"))


def _problem(exc: BaseException) -> str:
    """What went wrong opening the storage, in one line."""
    from sqlalchemy.exc import DBAPIError, NoSuchModuleError, OperationalError

    if isinstance(exc, ImportError):
        module = getattr(exc.__cause__, "name", None) or getattr(exc, "name", None)
        if module:
            return f"its driver {module} is not installed (pip install {DRIVER_PACKAGES.get(module, module)})"
    if isinstance(exc, NoSuchModuleError):
        return f"SQLAlchemy has no dialect for this URL ({exc})"
    if isinstance(exc, DBAPIError):
        lines = [line.strip() for line in str(exc.orig).splitlines() if line.strip()]
        what = "cannot connect" if isinstance(exc, OperationalError) else "cannot create or read Optuna's tables"
        return f"{what} ({' '.join(lines[:2])[:300]})"
    return f"cannot open ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]})"
