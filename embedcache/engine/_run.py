"""The two engines: tasks run in this process, or as tasks of a Dask cluster.

Both take the same thing, a task function (from :mod:`._tasks`) and a list of argument
tuples (block descriptions and scalars), and yield ``(task number, result)`` as tasks finish;
the caller merges the results on the client. The Dask engine submits one Dask task per
description; Dask reruns the tasks of a worker that dies, and since tasks only read, a rerun
gives the same result.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from embedcache import _config
from embedcache.errors import ClusterError, InvalidInputError, InvalidInputTypeError, MissingDependencyError

__all__ = ["Counted", "Dask", "InProcess", "connect", "engine_for"]

_HINT = 'dask is not installed; install it with: pip install "embedcache-sim[dask]"'


def _distributed():
    try:
        import distributed
    except ImportError as exc:
        raise MissingDependencyError(_HINT) from exc
    return distributed


class InProcess:
    """Runs the tasks one after another in this process (the kernels use every numba thread)."""

    def __repr__(self) -> str:
        return "InProcess()"

    def run(self, fn: Callable, tasks: Sequence[tuple], *, shared: dict[str, Any] | None = None,
            on_done: Callable[[int], None] | None = None) -> Iterator[tuple[int, Any]]:
        for k, args in enumerate(tasks):
            result = fn(*args, **(shared or {}))
            if on_done is not None:
                on_done(k)
            yield k, result


class Dask:
    """Runs each task as a Dask task on ``client``'s cluster.

    ``shared`` arguments (the queries of a search) are sent to every worker once; the others
    are small descriptions. Results are gathered as tasks finish and released on the cluster
    at once, so the cluster holds only the results not yet merged.
    """

    def __init__(self, client: Any) -> None:
        self.client = client

    def __repr__(self) -> str:
        return f"Dask({self.client.scheduler.address if self.client.scheduler else None!r})"

    def run(self, fn: Callable, tasks: Sequence[tuple], *, shared: dict[str, Any] | None = None,
            on_done: Callable[[int], None] | None = None) -> Iterator[tuple[int, Any]]:
        distributed = _distributed()
        client = self.client
        if not tasks:
            return
        prefix = f"embedcache-{fn.__name__.replace('_', '-')}-{uuid.uuid4().hex[:8]}"
        try:
            sent = {name: client.scatter(v, broadcast=True, hash=False) for name, v in (shared or {}).items()}
            threads = sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values())
        except OSError as exc:
            raise ClusterError(f"the Dask scheduler {_address(client)} cannot be reached: {exc}") from None
        # a window of tasks in flight: the client and scheduler hold a few per worker thread,
        # not millions of futures for a large store
        window = max(32, 4 * threads)
        todo = iter(enumerate(tasks))
        number: dict[Any, int] = {}
        pending = distributed.as_completed([], loop=client.loop)

        def submit_next() -> None:
            for k, args in todo:
                f = client.submit(fn, *args, **sent, key=f"{prefix}-{k}", pure=False)
                number[f.key] = k
                pending.add(f)
                return

        for _ in range(window):
            submit_next()
        try:
            for f in pending:
                try:
                    result = f.result()
                except distributed.KilledWorker as exc:
                    raise ClusterError(
                        f"a task of the job was running on every worker that died ({exc}); the job was "
                        "stopped (look at the workers' logs: out of memory?)"
                    ) from None
                except distributed.client.FutureCancelledError as exc:
                    raise ClusterError(
                        f"the job's tasks were cancelled by the Dask cluster {_address(client)}: {exc}"
                    ) from None
                k = number.pop(f.key)
                f.release()
                submit_next()
                if on_done is not None:
                    on_done(k)
                yield k, result
        finally:
            client.cancel([f for f in list(pending.futures) if not f.done()])  # after an error
            pending.clear()
            for v in sent.values():
                v.release()


class Counted:
    """``engine`` with a progress bar of its tasks (``bar``: ``update(n)`` and a ``total``):
    every job run adds its tasks to the bar's total, every finished task moves it one step.
    For work made of several jobs whose sizes are known only as they start (the scans of an
    index build)."""

    def __init__(self, engine: Any, bar: Any) -> None:
        self.engine = engine
        self.bar = bar

    def __repr__(self) -> str:
        return f"Counted({self.engine!r})"

    def run(self, fn: Callable, tasks: Sequence[tuple], *, shared: dict[str, Any] | None = None,
            on_done: Callable[[int], None] | None = None) -> Iterator[tuple[int, Any]]:
        bar = self.bar
        bar.total = (bar.total or 0) + len(tasks)
        if callable(getattr(bar, "refresh", None)):
            bar.refresh()

        def done(k: int) -> None:
            bar.update(1)
            if on_done is not None:
                on_done(k)

        return self.engine.run(fn, tasks, shared=shared, on_done=done)


def _address(client: Any) -> str:
    try:
        return str(client.scheduler.address)
    except AttributeError:
        return "(unknown address)"


def connect(address: str, *, timeout: float | None = None):
    """A ``distributed.Client`` of the scheduler at ``address`` (``tcp://HOST:PORT``), or
    :class:`~embedcache.ClusterError` (one line) when none answers within ``timeout`` s
    (default: ``_config.SCHEDULER_TIMEOUT``)."""
    distributed = _distributed()
    timeout = float(_config.SCHEDULER_TIMEOUT if timeout is None else timeout)
    if not isinstance(address, str) or "://" not in address:
        raise InvalidInputError(f"scheduler must be an address like tcp://HOST:PORT, got {address!r}")
    try:
        return distributed.Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise ClusterError(f"cannot reach the Dask scheduler at {address} within {timeout:g} s ({detail})") from None


def engine_for(client: Any) -> InProcess | Dask:
    """The engine for ``client=``: None runs in this process, a ``distributed.Client`` on its cluster."""
    if client is None:
        return InProcess()
    if isinstance(client, (InProcess, Dask)):
        return client
    distributed = _distributed()
    if not isinstance(client, distributed.Client):
        raise InvalidInputTypeError(
            f"client must be a distributed.Client (or None to run here), got {type(client).__name__}"
        )
    return Dask(client)
