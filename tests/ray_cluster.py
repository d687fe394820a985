"""A real two-node Ray cluster on loopback for the cluster tests, started once per test session on first use
(`edge_cbn.cluster.local_ray`: `ray start --head` on a free port and a second `ray start --address …` node
on the same machine, one CPU each, stopped by their pids afterwards)."""
import os
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


@pytest.fixture(scope="session")
def ray_cluster():
    """The address of the running cluster; this process is connected to it as a driver."""
    pytest.importorskip("ray")
    from edge_cbn.cluster.local_ray import LocalRayCluster

    # Worker processes import the tests' helpers (tests/sweep_faults.py) as the driver does.
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    with LocalRayCluster(nodes=2, cpus_per_node=1, env={"PYTHONPATH": path}) as address:
        yield address
