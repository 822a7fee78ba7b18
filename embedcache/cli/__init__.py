"""The ``embedcache`` command: embed, deduplicate, list near-duplicate pairs, manage stores
and the cache, from plain text, JSON Lines, CSV/TSV or Parquet files.

Argument parsing and printing only: the work is done by the library, and files are read and
written by :mod:`embedcache.tables` (outputs checked before any work is done, and renamed into
place only when all of a command's outputs are complete). Every user error is one line on
stderr and a non-zero exit status.

The commands live in the modules of this package: :mod:`._rows` (models, embed, dedup,
pairs, graph), :mod:`._store`, :mod:`._cache` and :mod:`._serve`; :mod:`._options` holds what
they share, :mod:`._search` stores as input and ``--method``/``--recall``.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence

import click

from embedcache.cli._cache import cache
from embedcache.cli._options import _close_opened, _notes, _one_line
from embedcache.cli._rows import dedup, embed, graph, models, pairs
from embedcache.cli._serve import serve
from embedcache.cli._store import store
from embedcache.errors import EmbedCacheError

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="embedcache-sim", prog_name="embedcache")
def cli() -> None:
    """Embeddings that are never paid for twice: embed, deduplicate, find near-duplicates."""


for _command in (models, embed, dedup, pairs, graph, store, cache, serve):
    cli.add_command(_command)


_NoArgsIsHelp = getattr(click.exceptions, "NoArgsIsHelpError", ())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; user errors are one line on stderr and a non-zero exit."""
    for stream in (sys.stdout, sys.stderr):  # texts, ids and messages may hold lone surrogates
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    try:
        result = cli.main(args=list(argv) if argv is not None else None, prog_name="embedcache",
                          standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("embedcache: interrupted", err=True)
        return 130
    except _NoArgsIsHelp as exc:  # a group without its command: show its help
        click.echo(exc.ctx.get_help() if exc.ctx is not None else exc.format_message(), err=True)
        return exc.exit_code
    except click.UsageError as exc:
        hint = f" (see: {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
        click.echo(f"embedcache: error: {_one_line(exc.format_message())}{hint}", err=True)
        return exc.exit_code
    except click.ClickException as exc:
        click.echo(f"embedcache: error: {_one_line(exc.format_message())}", err=True)
        return exc.exit_code
    except EmbedCacheError as exc:
        click.echo(f"embedcache: error: {_one_line(str(exc))}", err=True)
        return 1
    except OSError as exc:
        detail = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else str(exc)
        click.echo(f"embedcache: error: {_one_line(detail)}", err=True)
        return 1
    finally:
        _close_opened()  # after Ctrl-C too: stops requests still under way
        notes, _notes[:] = list(_notes), []
    for note in notes:
        click.echo(note, err=True)
    return result if isinstance(result, int) else 0
