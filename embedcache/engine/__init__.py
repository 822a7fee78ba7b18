"""Where the store's jobs run: in this process, or as tasks on a Dask cluster.

A job is a list of small task descriptions, run by an engine, and merged on the client:

``_plan``   :class:`Block`: live rows of a store named by segment paths and row ranges (never
            the vectors), and ``read``, which a task uses to open them read-only by memory map
``_tasks``  what one task computes from its blocks: a tile of pairs, the top-k of a block
``_run``    the engines, :class:`InProcess` and :class:`Dask` (``distributed``, an optional
            extra imported when a client is given), behind one method: ``run(fn, tasks)``
            yields ``(task number, result)`` as tasks finish; :class:`Counted` adds a
            progress bar of the tasks of every job an engine runs
``_jobs``   the store's jobs: the task lists (tiles of the upper triangle, blocks against the
            store, blocks against a reference set) and the merge of their results on the
            client
``_source`` the store's rows as a source of rows for the partition index
            (:mod:`embedcache.index`): its scans (assignment to cells, nearest cells, the
            recall calibration's exact side) and its search (a task per group of cells) as
            tasks, computed by the index's own per-cell functions

Workers need the store's directory at the same path as the client (a shared filesystem such
as NFS; object storage is not supported). They only read, so a worker that dies cannot damage
the store, and Dask reruns its tasks with the same result. Scores come from the kernels, so a
job on a cluster gives the pairs and scores of one machine bit for bit; the partitioned
method, with the same seed, the same cells, probes, recall and pairs.
"""

from embedcache.engine._plan import Block, Piece, plan, read
from embedcache.engine._run import Counted, Dask, InProcess, connect, engine_for

__all__ = ["Block", "Counted", "Dask", "InProcess", "Piece", "connect", "engine_for", "plan", "read"]
