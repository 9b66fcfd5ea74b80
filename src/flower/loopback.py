"""`python -m src.flower.loopback [--nodes N] [overrides ...]`: a real Flower deployment on this machine.

Starts a SuperLink (TLS, SuperNode authentication on) and N SuperNodes as separate processes
on 127.0.0.1, registers the nodes' public keys, submits the app with `flwr run`, waits for the
ServerApp's results.json and stops every process. Certificates and node keys come from
`make certs` (deploy/certificates.sh). Across machines the same commands run on each host (docs/flower.md).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from src.cli.jobs import check_command_line
from src.data.paths import REPO_ROOT, candidate_roots
from src.flower.settings import flower_checks
from src.runtime.errors import OneLineParser, UserError, reported

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Loopback:
    """SuperLink and SuperNodes as child processes; `with Loopback(...) as fed:` stops them all on exit."""

    def __init__(self, workdir: Path, certs: Path, nodes: int):
        self.workdir, self.certs, self.nodes = Path(workdir).resolve(), Path(certs).resolve(), int(nodes)
        for f in ["ca.crt", "server.pem", "server.key", *[f"node{p}" for p in range(self.nodes)]]:
            if not (self.certs / f).is_file():
                raise UserError(
                    f"{self.certs / f} is missing; expected the output of `make certs` "
                    f"(deploy/certificates.sh {self.certs} {self.nodes})"
                )
        self.port = free_port()
        self.home = self.workdir / "flwr-home"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(self.home)}
        roots = [root for rule, root in candidate_roots(None) if rule != "download cache"]
        if roots and "ALIGNFEDREC_DATA" not in os.environ:
            self.env["ALIGNFEDREC_DATA"] = str(roots[0])

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "w")
        proc = subprocess.Popen(
            args, cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        """What process `name` printed so far."""
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def start(self) -> None:
        """SuperLink, the node keys registered, then every SuperNode."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.certs / "ca.crt"}"\n'
        )
        c = self.certs
        self._spawn(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                "--ssl-ca-certfile",
                str(c / "ca.crt"),
                "--ssl-certfile",
                str(c / "server.pem"),
                "--ssl-keyfile",
                str(c / "server.key"),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--port",
                str(self.port),
                "--database",
                str(self.workdir / "superlink.db"),
            ],
        )
        self._wait_listening(self.port, "superlink")
        for p in range(self.nodes):
            self.flwr(["supernode", "register", str(c / f"node{p}.pub"), "loopback"])
        for p in range(self.nodes):
            self.start_node(p)

    def start_node(
        self,
        p: int,
        key: str | None = None,
        root_ca: str = "ca.crt",
        name: str | None = None,
        extra: list[str] | None = None,
    ) -> subprocess.Popen:
        """SuperNode `p` of the partition, authenticating with `key` (default node<p>)."""
        c = self.certs
        return self._spawn(
            name or f"node{p}",
            [
                str(BIN / "flower-supernode"),
                "--root-certificates",
                str(c / root_ca),
                "--superlink",
                f"127.0.0.1:{self.port}",
                "--port",
                str(free_port()),
                "--auth-supernode-private-key",
                str(c / (key or f"node{p}")),
                "--node-config",
                f"partition-id={p} num-partitions={self.nodes}",
                *(extra or []),
            ],
        )

    def kill(self, name: str) -> None:
        """Kill a process and its children at once (SIGKILL), as a crash would."""
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def flwr(self, args: list[str], timeout: float = 120) -> str:
        """Run the `flwr` CLI against this SuperLink; raise with its output when it fails."""
        out = subprocess.run(
            [str(BIN / "flwr"), *args], cwd=REPO_ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if out.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return out.stdout

    def submit(self, overrides: list[str]) -> None:
        """`flwr run . loopback` with the Hydra overrides as the run config (single quotes become double:
        the run config carries them inside a TOML literal string)."""
        text = " ".join(overrides).replace("'", '"')
        self.flwr(["run", ".", "loopback", "--run-config", f"overrides='{text}'"])

    def _wait_listening(self, port: int, name: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited with {self.procs[name].returncode}:\n{self.log(name)[-3000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.3)
        raise TimeoutError(f"{name} did not listen on port {port} within {timeout} s")

    def stop(self) -> None:
        """Stop every process still running."""
        for name in list(self.procs):
            self.kill(name)

    def __enter__(self) -> Loopback:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_results(run_dir: Path, timeout: float, rounds: int | None = None) -> dict:
    """results.json of a finished run (or one with `rounds` rounds), polled until `timeout` s."""
    path = Path(run_dir) / "results.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file():
            payload = json.loads(path.read_text())
            if payload.get("finished") or (rounds is not None and len(payload["history"]) >= rounds):
                return payload
        time.sleep(0.5)
    raise TimeoutError(f"{path} not finished within {timeout} s")


def main() -> None:
    """Run one experiment on a loopback deployment and print where its results are."""
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2, help="SuperNodes (each holds every n-th client)")
    parser.add_argument("--certs", default=str(REPO_ROOT / "certificates"), help="output of `make certs`")
    parser.add_argument("--workdir", default=str(REPO_ROOT / "outputs" / "flower-loopback"))
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the run to finish")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. dataset=filmtrust fl.rounds=5")
    args = parser.parse_args()
    if args.nodes < 1:
        parser.error(f"--nodes={args.nodes} is invalid; expected an integer >= 1")
    workdir = Path(args.workdir) / time.strftime("%Y-%m-%d_%H-%M-%S")
    run_dir = workdir / "run"
    # the ServerApp composes the config inside the SuperLink, where a bad value would only show as a timeout:
    # compose and check it here first, as the simulator's command does
    overrides = check_command_line(
        [*args.overrides, f"flower.run_dir={run_dir}", f"flower.min_nodes={args.nodes}"], flower_checks
    )
    with reported(), Loopback(workdir, Path(args.certs), args.nodes) as fed:
        fed.submit(overrides)
        payload = wait_results(run_dir, args.timeout)
    best = payload["test_at_best"]
    print(
        f"{len(payload['history'])} rounds on {args.nodes} SuperNodes; best round {payload['best_round']}: "
        f"test hit@10 {best.get('test/hit@10', float('nan')):.4f}; results in {run_dir}; logs in {workdir}"
    )


if __name__ == "__main__":
    main()
