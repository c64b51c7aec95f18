"""Connecting to Ray: one way for every stage's driver.

An open session is reused; otherwise ``address`` (or the RAY_ADDRESS environment variable)
names a cluster to join, and without either a local Ray is started on this machine (Ray's own
discovery applies first: a cluster started here with ``ray start`` is joined).
"""

from __future__ import annotations

import os


def ensure_ray(address: str | None = None, num_cpus: int | None = None,
               log_to_driver: bool = False):
    """The ray module, connected: the open session, ``address`` / RAY_ADDRESS, or a local Ray.

    ``num_cpus`` sizes a local Ray (None: the CPUs Ray detects); a cluster brings its own
    resources, so it is not passed when joining one. ``log_to_driver`` streams the workers'
    output to this process. No dashboard is started.
    """
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=log_to_driver, include_dashboard=False)
    else:
        ray.init(num_cpus=num_cpus, log_to_driver=log_to_driver, include_dashboard=False)
    return ray
