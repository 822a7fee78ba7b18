"""``embedcache serve``: the caching proxy in front of an OpenAI-compatible server."""

from __future__ import annotations

import click


@click.command()
@click.option("--upstream", required=True, metavar="URL",
              help="OpenAI-compatible API root, e.g. https://openai.inference.de-txl.ionos.com/v1.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Cache directory (default: $EMBEDCACHE_DIR or ~/.cache/embedcache), shared with the library.")
@click.option("--keys", "keys_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Client keys, one per line ('NAME KEY' names it, '#' comments); without it, loopback only.")
@click.option("--allow-public", is_flag=True, help="Serve a non-loopback interface without --keys.")
@click.option("--requests-per-second", "rps", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Upstream requests per second, all clients together (default: the IONOS limit for IONOS, else none).")
@click.option("--burst", type=click.IntRange(min=1), default=10, show_default=True,
              help="Upstream requests allowed at once above the rate.")
@click.option("--max-concurrency", type=click.IntRange(min=1), default=8, show_default=True,
              help="Upstream requests in flight at once.")
@click.option("--client-rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Requests per second each client key may send (default: no limit).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
def serve(upstream, host, port, cache_dir, keys_path, allow_public, rps, burst, max_concurrency,
          client_rate, log_level):
    """Serve the cache to any OpenAI-compatible client: a caching proxy in front of --upstream."""
    from embedcache.server import serve as run

    run(upstream, host=host, port=port, cache=cache_dir, keys=keys_path, allow_public=allow_public,
        requests_per_second="auto" if rps is None else rps, burst=burst,
        max_concurrency=max_concurrency, client_rate=client_rate, log_level=log_level)
