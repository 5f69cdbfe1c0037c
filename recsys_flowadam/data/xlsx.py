"""Fast reader for all-numeric .xlsx sheets (the Jester-4 ratings workbook).

openpyxl builds a Python object per cell and needs 10-20 s for Jester-4's 1.2M cells; this
reader turns the first sheet's ``<c>`` elements into CSV text with one regular-expression
substitution and parses that with pandas' C parser (about a second). It handles only plain numeric cells;
anything else (shared or inline strings, booleans, errors, formulas, an unexpected element
layout) makes it return None, and the caller falls back to openpyxl, so results never differ.
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path, PurePosixPath
from xml.etree import ElementTree

import numpy as np
import pandas as pd

_NS_MAIN = "{http://schemas.openxmlformats.org/spreadsheetml/2006/main}"
_NS_REL = "{http://schemas.openxmlformats.org/officeDocument/2006/relationships}"
_NS_PKG = "{http://schemas.openxmlformats.org/package/2006/relationships}"
# <c r="B12" s="3"><v>-9.5</v></c>, <c r="C3" s="1"/>, optionally t="n"
_ROW = re.compile(rb"</?row(?: [^>]*)?>")
_CELL = re.compile(rb'<c r="([A-Z]{1,3})([0-9]+)"(?: s="[0-9]+")?(?: t="n")?(?:/>|>(?:<v>([^<]*)</v>)?</c>)')


def first_sheet_path(zf: zipfile.ZipFile) -> str:
    workbook = ElementTree.fromstring(zf.read("xl/workbook.xml"))
    sheet = workbook.find(f"{_NS_MAIN}sheets/{_NS_MAIN}sheet")
    rid = sheet.get(f"{_NS_REL}id")
    rels = ElementTree.fromstring(zf.read("xl/_rels/workbook.xml.rels"))
    for rel in rels.iter(f"{_NS_PKG}Relationship"):
        if rel.get("Id") == rid:
            target = rel.get("Target")
            if target.startswith("/"):
                return target.lstrip("/")
            return str(PurePosixPath("xl") / target)
    raise KeyError(rid)


def read_numeric_sheet(path: Path) -> np.ndarray | None:
    """The first sheet as a float64 matrix (NaN for empty cells), or None if it is not plain numeric.

    The ``<sheetData>`` XML is rewritten by C-level regex substitution into ``COL,ROW,VALUE``
    lines that pandas' C parser reads: no Python object per cell.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            xml = zf.read(first_sheet_path(zf))
    except (KeyError, AttributeError, zipfile.BadZipFile, ElementTree.ParseError):
        return None
    start, end = xml.find(b"<sheetData>"), xml.rfind(b"</sheetData>")
    if start < 0 or end < start:
        return None
    body = _ROW.sub(b"", xml[start + len(b"<sheetData>"):end])
    n_cells = body.count(b"<c ")
    text, n_done = _CELL.subn(rb"\1,\2,\3\n", body)
    if n_cells == 0 or n_done != n_cells or b"<" in text:
        return None
    try:
        frame = pd.read_csv(io.BytesIO(text), header=None, names=["col", "row", "value"],
                            dtype={"col": str, "row": np.int64, "value": np.float64}, engine="c")
    except (ValueError, pd.errors.ParserError):
        return None
    codes, letters = pd.factorize(frame["col"].to_numpy(dtype=object))
    col_of = np.array([_column_index(u) for u in letters.tolist()], dtype=np.int64)
    cols = col_of[codes]
    rows = frame["row"].to_numpy() - 1
    if rows.min() < 0:
        return None
    out = np.full((int(rows.max()) + 1, int(cols.max()) + 1), np.nan)
    out[rows, cols] = frame["value"].to_numpy()
    return out


def _column_index(letters: str) -> int:
    index = 0
    for ch in letters:
        index = index * 26 + (ord(ch) - 64)
    return index - 1
