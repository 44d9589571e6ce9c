"""SwiftLoader: a local multi-process loader for map-style datasets, built on tensorcom's request protocol.

``SwiftLoader(dataset_class=D, dataset_kwargs=kw, batch_size=32, nb_consumer=4, worker_per_consumer=4)`` then
``loader.start(consumer_index)`` and ``for batch in loader``. See :mod:`tensorcom.loader.swift` and
``docs/swiftloader.md``. torch is imported only when batches hold tensors or go to a device.
"""

from __future__ import annotations

from tensorcom.loader._pipeline import NearbyPermutation
from tensorcom.loader.swift import LOADER_ID_VARIABLE, SwiftLoader, SwiftLoaderOptions

__all__ = ["LOADER_ID_VARIABLE", "NearbyPermutation", "SwiftLoader", "SwiftLoaderOptions"]
