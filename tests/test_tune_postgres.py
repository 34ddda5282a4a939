"""`trainforge tune` on a real PostgreSQL server, through the README's commands: workers started together on an empty
database, a worker killed mid-trial whose trial is failed and run again, the study read back with Optuna and its
best config re-trained.

The server: $TRAINFORGE_TEST_POSTGRES, a URL whose user may create databases (`.ci/run` sets it), else a throwaway
one that `.ci/postgres` starts from the distribution's package. Without either the tests skip, saying so, except
where they must run: with $TRAINFORGE_TEST_POSTGRES set or in CI ($CI) they fail instead.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from conftest import REPO, run_cli

STUDY = "mnist-linear"


def skip_or_fail(reason: str):
    if os.environ.get("TRAINFORGE_TEST_POSTGRES") or os.environ.get("CI"):
        pytest.fail(f"the PostgreSQL tests must run here, but {reason}")
    pytest.skip(reason, allow_module_level=True)


try:
    import psycopg
except ImportError:
    skip_or_fail("no PostgreSQL driver is installed (pip install -e '.[dev]' brings psycopg)")


@pytest.fixture(scope="module")
def postgres_server():
    """The URL of a PostgreSQL server whose user may create databases."""
    url = os.environ.get("TRAINFORGE_TEST_POSTGRES")
    if url:
        yield url
        return
    folder = tempfile.mkdtemp(prefix="trainforge-pg-")  # directly under /tmp: the postgres user must reach it
    started = subprocess.run([str(REPO / ".ci" / "postgres"), "start", folder], capture_output=True, text=True,
                             timeout=120)
    if started.returncode == 3:
        shutil.rmtree(folder, ignore_errors=True)
        skip_or_fail(f"{started.stderr.strip()}; or set TRAINFORGE_TEST_POSTGRES to a server's URL")
    assert started.returncode == 0, started.stderr
    try:
        yield started.stdout.strip()
    finally:
        subprocess.run([str(REPO / ".ci" / "postgres"), "stop", folder], capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def empty_database(postgres_server):
    """The URL of a new database on the server, without a single table."""
    from sqlalchemy.engine import make_url

    name = f"tune_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield make_url(postgres_server).set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# Each process imports, says it is ready, then waits for the gate file and opens the storage within a millisecond
# of the others: without the retries, all but one die on duplicate tables.
OPEN_AT_THE_GATE = """
import pathlib, sys, time
from trainforge.tune.storage import open_storage
url, gate, ready = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
ready.touch()
deadline = time.monotonic() + 120
while not gate.exists():
    if time.monotonic() > deadline:
        sys.exit("the gate never opened")
    time.sleep(0.001)
open_storage(url)
"""


def test_workers_opening_an_empty_database_at_the_same_instant_all_succeed(empty_database, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    gate = tmp_path / "gate"
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT_THE_GATE, empty_database, str(gate),
                               str(tmp_path / f"ready-{i}")], env=env, stderr=subprocess.PIPE, text=True)
             for i in range(3)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{i}").exists() for i in range(3)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a process never got ready"
        time.sleep(0.05)
    gate.touch()
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 3, errors


def tune(url, out, trials, *extra):
    """The README's multi-machine command, small: linear model, 3,000 images, 2-epoch trials."""
    return ["tune", "--data", "mnist", "--model", "linear", "--subset", "3000", "--epochs", "2",
            "--trials", str(trials), "--storage", url, "--study", STUDY, "--out", str(out), "--json", *extra]


def start(args, **env):
    return subprocess.Popen([sys.executable, "-m", "trainforge", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO), **env})


def test_readme_commands_share_a_study_survive_a_killed_worker_and_retrain_its_best(empty_database, tmp_path):
    import optuna
    from optuna.trial import TrialState

    from trainforge.tune import search_space

    url = empty_database
    # Two workers (two machines, in the README) started at the same instant on the empty database.
    first = [start(tune(url, tmp_path / f"machine{i}", 4)) for i in range(2)]
    results = [p.communicate(timeout=300) for p in first]
    assert [p.returncode for p in first] == [0, 0], [err for _, err in results]
    study = optuna.load_study(study_name=STUDY, storage=url)
    done = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) >= 4
    recipe = search_space({"model": "linear", "subset": 3000, "epochs": 2}).defaults()
    assert [t.params for t in study.trials].count(recipe) == 1  # the recipe's trial, enqueued by one worker only

    # A third worker, killed (SIGKILL) while its trial runs: each file its trial writes takes a minute (the crash
    # tests' fault hook), so the trial is mid-way when the worker dies.
    killed = start(tune(url, tmp_path / "machine2", len(done) + 1, "--heartbeat", "1"),
                   TRAINFORGE_TEST_WRITE_DELAY="60")
    victim = _running_trial_of(killed, study, url)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    assert study.trials[victim.number].state == TrialState.RUNNING  # left running by its dead worker
    time.sleep(2 * 1 + 1)  # its heartbeat, silent since the kill, is now older than twice --heartbeat

    # The same command again: its first trial fails the dead one and runs its parameters again.
    retry = run_cli(*tune(url, tmp_path / "machine3", len(done) + 1, "--heartbeat", "1"))
    assert retry.returncode == 0, retry.stderr
    trials = optuna.load_study(study_name=STUDY, storage=url).trials
    assert trials[victim.number].state == TrialState.FAIL
    rerun = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(rerun) == 1 and rerun[0].params == victim.params
    assert rerun[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert not [t for t in trials if t.state == TrialState.RUNNING]

    # Read back with Optuna on the same URL; the best config re-trains to the same validation accuracy.
    best = optuna.load_study(study_name=STUDY, storage=url).best_trial
    summary = json.loads(retry.stdout.strip().splitlines()[-1])
    assert summary["best_trial"] == best.number and summary["best_value"] == best.value
    retrained = run_cli("train", "--config", summary["config_path"], "--json", cwd=tmp_path)
    assert retrained.returncode == 0, retrained.stderr
    assert abs(json.loads(retrained.stdout.strip().splitlines()[-1])["test_acc"] - best.value) <= 0.005


def _running_trial_of(proc, study, url):
    """The trial `proc` runs, once the storage holds its heartbeat (a trial without one is never found stale)."""
    from optuna.trial import TrialState

    me = f"{socket.gethostname()}:{proc.pid}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        mine = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if t.user_attrs.get("worker") == me]
        if mine:
            with psycopg.connect(url) as conn:
                if conn.execute("SELECT 1 FROM trial_heartbeats WHERE trial_id = %s", (mine[0]._trial_id,)).fetchone():
                    return mine[0]
        time.sleep(0.2)
    pytest.fail("the third worker never started a trial")


def test_bad_server_input_is_one_line_naming_the_url(postgres_server):
    from sqlalchemy.engine import make_url

    from trainforge.errors import ConfigError
    from trainforge.tune.storage import open_storage

    url = make_url(postgres_server)
    for bad, problem in ((url.set(password="wrong-password"), "password authentication failed"),
                         (url.set(database="no_such_database"), 'database "no_such_database" does not exist')):
        text = bad.render_as_string(hide_password=False)
        with pytest.raises(ConfigError) as error:
            open_storage(text)
        message = str(error.value)
        assert message.startswith(f"--storage {bad.render_as_string(hide_password=True)}: cannot connect")
        assert problem in message and "\n" not in message and f":{bad.password}@" not in message
