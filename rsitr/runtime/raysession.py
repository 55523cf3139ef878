"""Connecting this process to Ray: the cluster it is told about, else a local one."""

from __future__ import annotations

import os

import ray
import ray.data

# RAY_ADDRESS often holds a dashboard URL (what `ray job submit` and JobSubmissionClient want); ray.init needs
# the cluster (GCS) address instead, which RSITR_RAY_CLUSTER carries when both are set.
CLUSTER_VARIABLE = "RSITR_RAY_CLUSTER"

# Ray Data 2.60 lists each Parquet read's files through a pool of footer-reading actors, 32 by default: sized for
# big clusters reading object stores. On a few cores, starting those processes costs more than the reads (a third
# of a small training run's CPU time). Ray's workers read it from the environment their raylet started with, so
# it is set before a local Ray starts.
FOOTER_ACTORS_VARIABLE = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"


def cluster_address() -> str | None:
    """The address ``ray.init`` should connect to, or None to start a local Ray."""
    explicit = os.environ.get(CLUSTER_VARIABLE)
    if explicit:
        return explicit
    address = os.environ.get("RAY_ADDRESS")
    if address and not address.startswith(("http://", "https://")):
        return address
    return None


def local_ray_environment() -> dict[str, str]:
    """Variables for the processes of a Ray started on this machine: one footer reader per 8 cores (1 to 32), unless
    the environment already names a count."""
    actors = max(1, min(32, (os.cpu_count() or 1) // 8))
    return {FOOTER_ACTORS_VARIABLE: os.environ.get(FOOTER_ACTORS_VARIABLE) or str(actors)}


def init_ray() -> None:
    """Connect to the configured cluster, or start a local Ray, once per process.

    A fresh local Ray declares at least 4 logical CPUs: with only 2, the train workers and Ray Data's read and
    decode stages starve each other; torch runs one thread per worker anyway.
    """
    if not ray.is_initialized():
        address = cluster_address()
        if address is None:
            # ray.init would otherwise reject an http RAY_ADDRESS meant for job submission.
            os.environ.pop("RAY_ADDRESS", None)
            os.environ.update(local_ray_environment())
        ray.init(address=address, num_cpus=None if address else max(4, os.cpu_count() or 1))
    ray.data.DataContext.get_current().enable_progress_bars = False
