"""An on-disk vector store that never loses a committed row.

>>> import tempfile, numpy as np, embedcache as ec
>>> store = ec.VectorStore(tempfile.mkdtemp(), metric="dot")
>>> store.add(["a", "b", "c"], np.eye(3, dtype=np.float32), metadata=[{"lang": "en"}] * 3)
>>> len(store), "b" in store, store.ids()
(3, True, ['a', 'b', 'c'])
>>> scores, ids = store.search(np.array([[0.0, 1.0, 0.5]]), k=2)
>>> ids.tolist(), scores.tolist()
([['b', 'c']], [[1.0, 0.5]])
>>> store.delete(["b"]); store.search([0.0, 1.0, 0.5], k=1)[1].tolist()
[['c']]
>>> store.close()

The package, from the bottom up:

``_format``        the directory layout and SQLite schema (documented there), reading one
                   committed state (a ``View``) and ``verify``
``_transactions``  connections, the write lock, read and write transactions, orphan removal,
                   faults of the machine as ``StoreWriteError``
``_query``         rows by id and ids by row, ``where`` filters, the top-k merge across
                   segments, pairs
``_write``         checking what is added, the fsync protocol, ingest, delete, compact
``_index``         the persisted partition index: build, files, search through it, verify
``_vector_store``  ``VectorStore``, the facade over them
"""

from __future__ import annotations

from embedcache.store._format import FORMAT_VERSION
from embedcache.store._vector_store import VectorStore
from embedcache.store._write import text_ids

__all__ = ["FORMAT_VERSION", "VectorStore", "text_ids"]
