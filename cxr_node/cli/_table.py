"""Aligned tables for the CLI (``tabulate``: one small, well-kept dependency instead of
hand-padded columns that broke on long values), a count line below each."""

from __future__ import annotations

from typing import Any, Sequence, TextIO


def write_table(out: TextIO, columns: Sequence[str], rows: Sequence[Sequence[Any]], footer: str,
                wrap: dict[str, int] | None = None) -> None:
    """``columns`` as upper-case headers, ``rows`` aligned (None as '-'), long text in the
    columns named in ``wrap`` wrapped at that many characters, then ``footer`` on its own line."""
    from tabulate import tabulate

    cells = [["-" if v is None or v == "" else v for v in row] for row in rows]
    widths = [(wrap or {}).get(c) for c in columns]
    if cells:
        out.write(tabulate(cells, headers=[c.upper().replace("_", " ") for c in columns], tablefmt="simple",
                           disable_numparse=True, maxcolwidths=widths if any(widths) else None) + "\n")
    out.write(footer + "\n")


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"
