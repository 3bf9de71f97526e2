"""Batch (data) parallelism: a 1-D device mesh, the batch axis sharded, parameters replicated.

jit propagates the shardings, so the same ``prefill`` / ``decode_step`` / eval functions run sharded
when their inputs are placed with these helpers.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH = "batch"


def batch_mesh(devices=None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all) named "batch". Built with ``Mesh`` directly, which gives
    Auto axes on every jax version (``jax.make_mesh`` defaults to Explicit axes in 0.10, which Pallas rejects)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (BATCH,))


def shard_batch(tree, mesh: Mesh):
    """Places every array of ``tree`` with its leading (batch) axis split over the mesh.

    The batch must divide evenly by the number of devices; the error says so otherwise.
    """
    n = mesh.devices.size

    def put(x):
        if getattr(x, "ndim", 0) == 0:
            return jax.device_put(x, NamedSharding(mesh, P()))
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} does not divide over {n} devices; pad the batch to a multiple of {n}")
        return jax.device_put(x, NamedSharding(mesh, P(BATCH, *([None] * (x.ndim - 1)))))

    return jax.tree_util.tree_map(put, tree)


def replicate(tree, mesh: Mesh):
    """Places every array of ``tree`` in full on every device of the mesh."""
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, NamedSharding(mesh, P())), tree)
