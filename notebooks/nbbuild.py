"""Shared by the notebook generators: turn a list of (kind, source) cells into an .ipynb.

Notebooks are generated so that their source stays reviewable as Python; cell ids are fixed,
so rebuilding an unchanged notebook gives an identical file.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook


def build(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = new_notebook(metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
        "language_info": {"name": "python"},
    })
    for i, (kind, source) in enumerate(cells):
        cell = new_markdown_cell(source) if kind == "md" else new_code_cell(source)
        cell.id = f"cell-{i:02d}"
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def write(cells: list[tuple[str, str]], out: Path) -> None:
    nbformat.write(build(cells), out)
    print(f"wrote {out}")
