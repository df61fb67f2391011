"""Data sets and the fixed batch order. Everything is offline and nothing is unpickled.

``load(spec, dtype=, device=)`` turns a :class:`tjac.recipe.DataSpec` into a :class:`Dataset`:
``sources`` reads the arrays as stored (sklearn's bundled sets, in-memory arrays, ``.npz`` /
``.npy``, MNIST-style IDX, CIFAR binary; ``images`` holds the two image formats), ``prepare``
validates, preprocesses and applies the variant, ``batching`` orders the minibatches.
``digest(spec)`` is the ``{label: sha256}`` of the data without building tensors.
"""

from ._common import DataError
from .batching import BatchOrder
from .prepare import Dataset, available_bytes, load
from .sources import digest

__all__ = ["BatchOrder", "DataError", "Dataset", "available_bytes", "digest", "load"]
