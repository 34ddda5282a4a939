"""`trainforge` commands run as children forked from a server that has imported trainforge once.

A fresh interpreter spends about 2.5 s importing torch before the command starts, and a training 2.5 s more
importing torch._dynamo when it makes its optimizer; the suite runs about a hundred commands. The server imports
those and builds the parser, nothing else: forking a process that has run torch's threaded kernels can deadlock the
child. Each child takes the caller's whole environment, working directory and argv, and
leaves as the `trainforge` command does, its exit handlers run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

SERVER = r"""
import atexit, json, os, signal, sys, tempfile, time
import torch._dynamo  # what every optimizer's construction imports first: 2.5 s
from trainforge import cli
cli.build_parser()

def child(request):
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    for fd, name in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    os.environ.clear()
    os.environ.update(request["env"])
    tempfile.tempdir = None  # TMPDIR is the caller's
    os.chdir(request["cwd"])
    sys.argv = ["trainforge", *request["args"]]
    try:
        code = cli.main(request["args"])
    except SystemExit as exc:
        code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

def wait(pid, timeout):
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, 0 if deadline is None else os.WNOHANG)
        if done:
            return {"code": os.waitstatus_to_exitcode(status)}
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return {"code": -signal.SIGKILL, "timed_out": True}
        time.sleep(0.02)

for line in sys.stdin:
    request = json.loads(line)
    if "wait" in request:
        print(json.dumps(wait(request["wait"], request.get("timeout"))), flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        child(request)
    print(json.dumps({"pid": pid}), flush=True)
"""


class Server:
    """The forking server; `start` returns a Forked run, files for its output kept in `directory`."""

    def __init__(self, directory: Path, repo: Path):
        env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.process = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, env=env)
        self.directory, self.count = directory, 0

    def ask(self, request: dict) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, "the fork server died"
        return json.loads(line)

    def start(self, *args: str, env: dict[str, str | None] | None = None, cwd: Path | None = None) -> "Forked":
        """`trainforge ARGS` in this process's environment with `env`'s changes (None removes a variable)."""
        self.count += 1
        out, err = self.directory / f"{self.count}.out", self.directory / f"{self.count}.err"
        full = {**os.environ, **(env or {})}
        full = {k: v for k, v in full.items() if v is not None}
        pid = self.ask({"args": list(args), "env": full, "cwd": str(cwd or Path.cwd()), "stdout": str(out),
                        "stderr": str(err)})["pid"]
        return Forked(self, pid, list(args), out, err)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.kill()  # nothing left to flush; its children have all been waited for
        self.process.wait()


@dataclasses.dataclass
class Forked:
    server: Server
    pid: int
    args: list[str]
    out: Path
    err: Path

    def alive(self) -> bool:
        """Running, as opposed to finished (a zombie until `wait` reaps it, so its pid cannot be reused)."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except FileNotFoundError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] != "Z"

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> tuple[int, str, str]:
        """(exit code, negative for a signal; stdout; stderr); past `timeout` s the child is killed and
        subprocess.TimeoutExpired raised, as subprocess.run does."""
        answer = self.server.ask({"wait": self.pid, "timeout": timeout})
        out, err = self.out.read_text(), self.err.read_text()
        if answer.get("timed_out"):
            raise subprocess.TimeoutExpired(["trainforge", *self.args], timeout, out, err)
        return answer["code"], out, err
