"""Traffic: the reads and writes of one object, or of a directory's whole
subtree, counted as requests and bytes. The report's analysis
(``report/analysis.py``) and the live tree (``sinks/tree.py``) both count
with it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Traffic"]


@dataclass(slots=True)
class Traffic:
    """Reads and writes of one object (or one directory's subtree)."""

    reads: int = 0
    read_bytes: int = 0
    writes: int = 0
    write_bytes: int = 0

    @property
    def requests(self) -> int:
        return self.reads + self.writes

    @property
    def bytes(self) -> int:
        return self.read_bytes + self.write_bytes

    def add(self, other: Traffic) -> None:
        self.reads += other.reads
        self.read_bytes += other.read_bytes
        self.writes += other.writes
        self.write_bytes += other.write_bytes

    def as_dict(self) -> dict[str, int]:
        return {"reads": self.reads, "read_bytes": self.read_bytes,
                "writes": self.writes, "write_bytes": self.write_bytes}
