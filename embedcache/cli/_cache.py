"""``embedcache cache``: inspect, prune or clear the embedding cache."""

from __future__ import annotations

import click

from embedcache.cli._options import _cache, _format_size, cache_size_option, common_options
from embedcache.errors import InvalidInputError


@click.group()
def cache() -> None:
    """Inspect or clear the embedding cache."""


@cache.command("info")
@cache_size_option
@common_options
def cache_info(cache_dir, quiet):
    """Print the cache directory, entries, size, limit, evictions so far, and the models
    (namespaces) it holds vectors of."""
    with _cache(cache_dir) as c:
        info = c.info()
        click.echo(f"directory: {info['directory']}")
        click.echo(f"entries: {info['entries']}")
        click.echo(f"size: {_format_size(info['size_bytes'])} ({info['size_bytes']} bytes)")
        click.echo(f"size_limit: {_format_size(info['size_limit'])} (set with --cache-size)")
        click.echo(f"evicted: {info['evicted']} vectors so far")
        click.echo(f"free: {_format_size(info['free_bytes'])} on its disk")
        click.echo("namespaces:" if info["namespaces"] else "namespaces: none recorded")
        labelled = 0
        for ns in info["namespaces"]:
            labelled += ns["entries"]
            dims = ns["vector_dimensions"] or ns["dimensions"]
            click.echo(f"  {ns['namespace']}  model={ns['model'] or '-'}  dimensions={dims}  "
                       f"entries={ns['entries']}")
        if info["entries"] > labelled:
            click.echo(f"  (no namespace recorded)  entries={info['entries'] - labelled}")


@cache.command("prune")
@click.option("--namespace", "namespaces", multiple=True, required=True,
              help="Remove the cached vectors of this namespace (as cache info lists them); repeatable.")
@common_options
def cache_prune(namespaces, cache_dir, quiet):
    """Remove one model's (namespace's) cached vectors on purpose."""
    with _cache(cache_dir) as c:
        known = {ns["namespace"] for ns in c.info()["namespaces"]}
        unknown = [ns for ns in namespaces if ns not in known]
        if unknown:
            holds = ", ".join(sorted(known)) or "none"
            raise InvalidInputError(f"--namespace {unknown[0]!r}: the cache at {c.directory} holds no "
                                    f"vectors of it; namespaces it holds: {holds}")
        for ns in namespaces:
            click.echo(f"removed {c.prune(ns)} cached vectors of {ns} from {c.directory}")


@cache.command("clear")
@common_options
def cache_clear(cache_dir, quiet):
    """Remove every cached vector."""
    with _cache(cache_dir) as c:
        n = len(c)
        c.clear()
        click.echo(f"removed {n} cached vectors from {c.info()['directory']}")
