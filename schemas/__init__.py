"""The wire contract's Avro schemas: one ``.avsc`` per message family, namespace ``xsettle.v1``.

The files in this folder are the registry: a reader resolves a writer schema by the
CRC-64-AVRO fingerprint of its Parsing Canonical Form. Older versions of a family, kept so
that records written with them can still be read, live in ``history/``.
"""

from pathlib import Path

SCHEMA_DIR = Path(__file__).resolve().parent
"""Folder holding the current ``.avsc`` files."""

HISTORY_DIR = SCHEMA_DIR / "history"
"""Folder holding superseded writer schemas (still readable, never written)."""

__all__ = ["HISTORY_DIR", "SCHEMA_DIR"]
