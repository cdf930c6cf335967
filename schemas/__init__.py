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

CONTRACT_VERSION = "1.3"
"""The wire contract these schemas are (``docs/contract.md``'s title, the newest folder of
``history/``; tests hold the three together): the AsyncAPI document's version and a label of
``xsettle_build_info``."""

__all__ = ["CONTRACT_VERSION", "HISTORY_DIR", "SCHEMA_DIR"]
