"""The Slurm tests run against a real controller and two nodes on this machine (tests/slurm/cluster.py)."""

from __future__ import annotations

import pytest

from .cluster import Cluster, SlurmMissing


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except SlurmMissing as e:
        pytest.fail(str(e), pytrace=False)  # never a silent skip: CI installs Slurm
    yield cluster
    cluster.stop()


@pytest.fixture(autouse=True)
def _no_jobs_left(request):
    """Each test starts and ends with an empty queue (a test's leftover job would hold the nodes)."""
    yield
    if "slurm" in request.fixturenames:
        request.getfixturevalue("slurm").cancel_all()
