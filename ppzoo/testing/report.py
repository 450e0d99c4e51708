"""The architecture × check table that ``ppzoo check`` prints (plain text or Markdown)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ppzoo.testing.kit import CHECKS, CheckResult

__all__ = ["render_matrix"]

_WORD = {"passed": "pass", "skipped": "skip", "failed": "FAIL", "xfailed": "xfail"}


def render_matrix(
    results: Sequence[CheckResult], *, sources: Mapping[str, str] | None = None, markdown: bool = False
) -> str:
    """One row per adapter, one column per check; skips, expected failures and failures carry a
    numbered note that says why (a failure's note is the first line of its error; plain text
    output then lists every failure in full).

    Args:
        results: what :func:`ppzoo.testing.check_adapters` returned.
        sources: adapter name → the distribution that provides it, shown as a column.
        markdown: a Markdown table instead of aligned plain text.
    """
    adapters = list(dict.fromkeys(r.adapter for r in results))
    columns = [c.name for c in CHECKS if any(r.check == c.name for r in results)]
    by_cell = {(r.adapter, r.check): r for r in results}
    notes: dict[str, int] = {}
    rows = []
    for adapter in adapters:
        row = [adapter] + ([sources.get(adapter, "?")] if sources else [])
        for check in columns:
            r = by_cell.get((adapter, check))
            if r is None:
                row.append("-")
                continue
            cell = _WORD[r.status]
            why = r.reason if r.status in ("skipped", "xfailed") else _first_problem(r.error or "")
            # NOTE: the row names the adapter already; without it, one note serves every row.
            why = (why or "").removeprefix(f"adapter {adapter!r} ").removeprefix(f"adapter {adapter!r}: ")
            if r.status != "passed" and why:
                cell += f" ({notes.setdefault(why, len(notes) + 1)})"
            row.append(cell)
        rows.append(row)
    header = ["architecture"] + (["provided by"] if sources else []) + columns
    lines = _markdown(header, rows) if markdown else _plain(header, rows)
    lines += [""] + [f"({n}) {text}" for text, n in notes.items()] if notes else []
    failed = [r for r in results if r.status == "failed"]
    if failed and not markdown:
        lines += ["", "Failures:"]
        for r in failed:
            lines += [f"--- {r.adapter}-{r.check}", (r.error or "").rstrip()]
    summary = {word: sum(r.status == status for r in results) for status, word in _WORD.items()}
    lines += ["", ", ".join(f"{n} {word}" for word, n in summary.items() if n)]
    return "\n".join(lines)


def _first_problem(error: str) -> str:
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    listed = [line[2:] for line in lines if line.startswith("- ")]
    return (listed or lines or [""])[0]


def _plain(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [header] + rows]


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]
