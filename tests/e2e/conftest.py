"""One Ray session per e2e test module (workers of every run in the module share it)."""
import os

import pytest


@pytest.fixture(scope="module")
def ray_session():
    import ray
    from rlhf_ds.cluster.ray_group import start_ray

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    started = start_ray("", 2.0)
    yield ray
    if started:
        ray.shutdown()
