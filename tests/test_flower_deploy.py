"""A real loopback deployment: SuperLink and SuperNodes as separate processes, TLS and node keys.

Checks the three promises of the deployment: the run ends with the simulator's metrics (same
seed and settings), a node killed mid-round neither stops the run nor loses its clients' state,
and a node with the wrong CA or an unregistered key cannot join.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time

import pytest

pytest.importorskip("flwr")
from src.cli.train import train  # noqa: E402
from src.data.paths import REPO_ROOT  # noqa: E402
from src.flower.loopback import Loopback, wait_results  # noqa: E402
from tests.conftest import requires_real_data  # noqa: E402
from tests.test_flower import SMALL, compare  # noqa: E402

pytestmark = [
    requires_real_data,
    pytest.mark.skipif(
        shutil.which("openssl") is None or shutil.which("ssh-keygen") is None, reason="needs openssl and ssh-keygen"
    ),
]
NODES = 3


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """One SuperLink and three SuperNodes for the module (certificates made by deploy/certificates.sh)."""
    work = tmp_path_factory.mktemp("loopback")
    subprocess.run(
        ["bash", str(REPO_ROOT / "deploy" / "certificates.sh"), str(work / "certs"), str(NODES)],
        check=True,
        capture_output=True,
    )
    with Loopback(work / "fed", work / "certs", NODES) as fed:
        yield fed


def overrides(cache_dir, run_dir, *extra):
    return [
        *SMALL,
        f"data.cache_dir={cache_dir}",
        f"flower.run_dir={run_dir}",
        f"flower.min_nodes={NODES}",
        "flower.connect_timeout=120",
        *extra,
    ]


def test_wrong_ca_or_unregistered_key_cannot_join(deployment):
    wrong_ca = deployment.start_node(0, root_ca="rogue-ca.crt", name="wrong-ca", extra=["--max-retries", "1"])
    intruder = deployment.start_node(0, key="rogue-node", name="intruder", extra=["--max-retries", "1"])
    assert wrong_ca.wait(timeout=120) != 0 and intruder.wait(timeout=120) != 0
    deployment.procs.pop("wrong-ca"), deployment.procs.pop("intruder")
    assert "CERTIFICATE_VERIFY_FAILED" in deployment.log("wrong-ca")
    assert "Failed to activate SuperNode" in deployment.log("intruder")


# slow (a minute of real processes: a ClientApp process per node and stage of each round): the parity of the Flower
# app with the simulator is checked in-process in tests/test_flower.py (full, fedavg, fed_itemknn, DP noise,
# comm.delta, dropout); this is its end-to-end form over TLS, run by `make test-slow`
@pytest.mark.slow
def test_loopback_run_matches_the_simulator(deployment, compose_cfg, cache_dir, tmp_path):
    deployment.submit(overrides(cache_dir, tmp_path / "flower", "fl.rounds=2"))
    flower = wait_results(tmp_path / "flower", timeout=600)
    cfg = compose_cfg([*SMALL, "fl.rounds=2"])
    simulator = train(cfg, tmp_path / "sim", progress=False)
    compare(flower["history"], simulator["history"])
    assert [r["flower/replies"] for r in flower["history"]] == [NODES] * 2


@pytest.mark.slow
def test_secure_aggregation_runs_on_the_deployment(deployment, cache_dir, tmp_path):
    """SecAgg+ over the real SuperNodes: every round sums all three nodes' vectors and nothing goes in the clear
    (slow: each of SecAgg+'s four stages starts a ClientApp process per node)."""
    run_dir = tmp_path / "flower"
    deployment.submit(overrides(cache_dir, run_dir, "ablation=fed_itemknn", "flower.secagg=true", "fl.rounds=2"))
    history = wait_results(run_dir, timeout=900)["history"]
    assert [r["flower/secagg_nodes"] for r in history] == [NODES] * 2
    assert all(r["flower/upload_bytes"] == 0 and r["reported"] == 20 for r in history)


# slow (about two minutes of real processes): the same promise is checked in-process in tests/test_flower.py (a node
# that sends nothing in a round, a node restarted with an empty memory that rejoins from its state file); this is
# the end-to-end form, run by `make test-slow`
@pytest.mark.slow
def test_a_node_killed_mid_round_rejoins_with_its_state(deployment, cache_dir, tmp_path):
    run_dir = tmp_path / "flower"
    started = len(re.findall(r"Start `flwr-clientapp` process", deployment.log("node1")))
    deployment.submit(
        overrides(
            cache_dir, run_dir, "fl.rounds=4", "flower.round_timeout=60", f"flower.state_dir={tmp_path / 'state'}"
        )
    )
    wait_results(run_dir, timeout=600, rounds=1)
    deadline = time.monotonic() + 300
    # kill node 1 once its ClientApp of round 2 has started: the round is under way
    while len(re.findall(r"Start `flwr-clientapp` process", deployment.log("node1"))) < started + 2:
        assert time.monotonic() < deadline, deployment.log("node1")[-2000:]
        time.sleep(0.2)
    deployment.kill("node1")
    wait_results(run_dir, timeout=600, rounds=2)
    deployment.start_node(1)
    history = wait_results(run_dir, timeout=600)["history"]
    # round 2: the dead node's reply is missing (timeout) or an error the SuperLink sends for it once it
    # sees the node offline; nodes 0 and 2 are aggregated, and the run goes on. The restarted node is back
    # by round 4: on a loaded machine its start can miss round 3, which then aggregates nodes 0 and 2 again
    # (the node still listed and lost, or no longer listed)
    nodes = [int(r["flower/nodes"]) for r in history]
    lost = [r["flower/nodes"] - r["flower/replies"] + r["flower/failed"] for r in history]
    evaluated = [r["flower/evaluated"] for r in history]
    assert (nodes[0], lost[0], evaluated[0]) == (3, 0, 20) and (lost[1], evaluated[1]) == (1, 13)
    assert (nodes[2], lost[2], evaluated[2]) in {(3, 0, 20), (3, 1, 13), (2, 0, 13)}, history[2]
    assert (nodes[3], lost[3], evaluated[3]) == (3, 0, 20)
    assert all(r["flower/rejected"] == 0 for r in history)
    assert "Traceback" not in deployment.log("node1"), deployment.log("node1")[-2000:]
    assert [r["reported"] for r in history][1] < [r["reported"] for r in history][0]
    # node 1 came back with the state it saved after round 1, not a fresh initialisation
    assert (tmp_path / "state").is_dir() and len(list((tmp_path / "state").glob("run*-part1of3.pt"))) == 1
