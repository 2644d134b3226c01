"""A tiny writer of genuine Excel 97-2003 ``.xls`` files, for stand-in trees and test fixtures.

Messidor-1 ships its labels as ``.xls`` (BIFF8) workbooks and the project reads them with
pandas + xlrd, but no ``.xls`` writer (xlwt) is installed. So this module builds the bytes
itself: a BIFF8 workbook stream (BOF, one XF, BOUNDSHEET, EOF; then a worksheet of LABEL
and NUMBER cells) wrapped in an OLE2 compound document (header, one FAT sector, one directory
sector, the stream in regular sectors). pandas recognises the file by the OLE2 signature and
xlrd parses it exactly like a workbook saved by Excel.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Sequence

_SECTOR = 512
_MINI_STREAM_CUTOFF = 4096  # streams smaller than this would have to live in the mini stream
_END_OF_CHAIN, _FREE, _FAT_SECTOR, _NO_STREAM = 0xFFFFFFFE, 0xFFFFFFFF, 0xFFFFFFFD, 0xFFFFFFFF

Cell = str | float | int | None


def _record(kind: int, payload: bytes) -> bytes:
    return struct.pack("<HH", kind, len(payload)) + payload


def _bof(substream: int) -> bytes:
    return _record(0x0809, struct.pack("<HHHHII", 0x0600, substream, 0x0DBB, 0x07CC, 0, 0x06))


def _unicode(text: str, length_bytes: int) -> bytes:
    """XLUnicodeString: character count, flags (1 = UTF-16LE), characters."""
    count = struct.pack("<B" if length_bytes == 1 else "<H", len(text))
    return count + b"\x01" + text.encode("utf-16-le")


def _sheet_stream(rows: Sequence[Sequence[Cell]]) -> bytes:
    cells = []
    for row_index, row in enumerate(rows):
        for col_index, value in enumerate(row):
            if value is None:
                continue
            if isinstance(value, str):
                cells.append(_record(0x0204, struct.pack("<HHH", row_index, col_index, 0) + _unicode(value, 2)))
            else:
                cells.append(_record(0x0203, struct.pack("<HHHd", row_index, col_index, 0, float(value))))
    n_cols = max((len(row) for row in rows), default=0)
    dimensions = _record(0x0200, struct.pack("<IIHHH", 0, len(rows), 0, n_cols, 0))
    return _bof(0x0010) + dimensions + b"".join(cells) + _record(0x000A, b"")


def _workbook_stream(rows: Sequence[Sequence[Cell]], sheet_name: str) -> bytes:
    xf = _record(0x00E0, struct.pack("<HHHBBBBIIH", 0, 0, 0x0001, 0x20, 0, 0, 0, 0, 0, 0x20C0))
    codepage = _record(0x0042, struct.pack("<H", 1200))
    name = _unicode(sheet_name, 1)
    boundsheet_size = 4 + 6 + len(name)  # record header + position, visibility, type + name
    globals_without_sheet = _bof(0x0005) + codepage + xf
    sheet_offset = len(globals_without_sheet) + boundsheet_size + 4  # + EOF record
    boundsheet = _record(0x0085, struct.pack("<IBB", sheet_offset, 0, 0) + name)
    stream = globals_without_sheet + boundsheet + _record(0x000A, b"") + _sheet_stream(rows)
    return stream.ljust(max(len(stream), _MINI_STREAM_CUTOFF), b"\x00")


def _directory_entry(name: str, kind: int, child: int, start: int, size: int) -> bytes:
    encoded = (name + "\x00").encode("utf-16-le") if name else b""
    return (encoded.ljust(64, b"\x00")
            + struct.pack("<HBBIII", len(encoded), kind, 1, _NO_STREAM, _NO_STREAM, child)
            + bytes(16) + struct.pack("<IQQIQ", 0, 0, 0, start, size))


def _compound_document(stream: bytes) -> bytes:
    n_stream_sectors = -(-len(stream) // _SECTOR)
    if n_stream_sectors + 2 > _SECTOR // 4:
        raise ValueError("xls fixture too large for the one-FAT-sector writer")
    fat = [_FAT_SECTOR, _END_OF_CHAIN] + [2 + i + 1 for i in range(n_stream_sectors - 1)] + [_END_OF_CHAIN]
    fat_sector = struct.pack(f"<{_SECTOR // 4}I", *(fat + [_FREE] * (_SECTOR // 4 - len(fat))))
    directory = (_directory_entry("Root Entry", 5, 1, _END_OF_CHAIN, 0)
                 + _directory_entry("Workbook", 2, _NO_STREAM, 2, len(stream))
                 + _directory_entry("", 0, _NO_STREAM, 0, 0) * 2)
    header = (b"\xD0\xCF\x11\xE0\xA1\xB1\x1A\xE1" + bytes(16)
              + struct.pack("<HHHHH", 0x003E, 0x0003, 0xFFFE, 9, 6) + bytes(6)
              + struct.pack("<IIIIIIIII", 0, 1, 1, 0, _MINI_STREAM_CUTOFF, _END_OF_CHAIN, 0, _END_OF_CHAIN, 0)
              + struct.pack("<109I", 0, *([_FREE] * 108)))
    return header + fat_sector + directory + stream.ljust(n_stream_sectors * _SECTOR, b"\x00")


def write_xls(path: str | Path, rows: Sequence[Sequence[Cell]], sheet_name: str = "Feuil1") -> Path:
    """Write ``rows`` (strings, numbers or None for an empty cell) as a one-sheet ``.xls`` workbook."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_compound_document(_workbook_stream(rows, sheet_name)))
    return path
