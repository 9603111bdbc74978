"""Snapshot generators: each workload is a pair of snapshots, A and B (A changed), produced as
streams of byte blocks.

Every generator is
- deterministic: all randomness is SHAKE-128 of a seed string naming the workload and the
  block, so A and B (and every run) agree byte for byte, and B is produced from the seeds
  without reading A back;
- streaming: blocks of a few MiB, so no snapshot is ever held in memory.

The workloads:
- random (the storage scenarios): incompressible bytes; B = 8 overwrites and 2 insertions of
  0.1% each, evenly spread (~1% new bytes).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterable, Iterator

MiB = 1 << 20
GiB = 1 << 30
BLOCK = 4 * MiB  # random data per block
SAMPLE = 4 * MiB  # how much of A write_stream keeps

A_INDEX, B_INDEX, TERM = 1000, 1001, 3


def shake(seed: str, n: int) -> bytes:
    """n deterministic pseudo-random bytes for `seed`."""
    return hashlib.shake_128(seed.encode()).digest(n)


class Workload:
    """A pair of snapshots: `a_blocks()` and `b_blocks()` yield their bytes in order."""

    name = ""
    size = 0  # nominal size of A (the real one is within a record of it)
    a_text = ""  # what A is
    b_text = ""  # how B differs

    def a_blocks(self) -> Iterator[bytes]:
        raise NotImplementedError

    def b_blocks(self) -> Iterator[bytes]:
        raise NotImplementedError


def write_stream(blocks: Iterable[bytes], out: BinaryIO, sample: int = SAMPLE) -> tuple[int, bytes]:
    """Writes the blocks to `out`; returns (bytes written, the first `sample` bytes)."""
    n = 0
    head: list[bytes] = []
    kept = 0
    for blk in blocks:
        out.write(blk)
        n += len(blk)
        if kept < sample:
            piece = bytes(blk[: sample - kept])
            head.append(piece)
            kept += len(piece)
    return n, b"".join(head)


# --------------------------------------------------------------------------------------------
# random data with byte-range edits


@dataclass(frozen=True)
class Edit:
    pos: int  # offset in A
    kind: str  # "overwrite" (replaces `length` bytes at pos) or "insert" (adds them before pos)
    length: int


def apply_edits(blocks: Iterable[bytes], edits: list[Edit], content: Callable[[Edit], bytes]) -> Iterator[bytes]:
    """The stream `blocks` with the (sorted, non-overlapping) edits applied on the fly."""
    edits = sorted(edits, key=lambda e: e.pos)
    i, base, skip_to = 0, 0, 0
    for blk in blocks:
        view = memoryview(blk)
        end = base + len(blk)
        cur = base
        while cur < end:
            if skip_to > cur:
                cur = min(skip_to, end)
            elif i < len(edits) and edits[i].pos < end:
                e = edits[i]
                i += 1
                if e.pos < cur:
                    raise ValueError(f"edits overlap at {e.pos}")
                if e.pos > cur:
                    yield view[cur - base:e.pos - base]
                yield content(e)
                cur = e.pos
                if e.kind == "overwrite":
                    skip_to = e.pos + e.length
            else:
                yield view[cur - base:]
                cur = end
        base = end
    for e in edits[i:]:  # insertions at the very end
        if e.pos != base or e.kind != "insert":
            raise ValueError(f"edit at {e.pos} is past the end ({base})")
        yield content(e)


class RandomEdits(Workload):
    def __init__(self, name: str, size: int, edits: list[Edit], b_text: str, seed: str | None = None):
        self.name, self.size, self.edits, self.b_text = name, size, edits, b_text
        self.seed = seed or name
        self.a_text = "incompressible bytes (SHAKE-128)"

    def a_blocks(self) -> Iterator[bytes]:
        for k, off in enumerate(range(0, self.size, BLOCK)):
            yield shake(f"{self.seed}/a/{k}", min(BLOCK, self.size - off))

    def b_blocks(self) -> Iterator[bytes]:
        return apply_edits(self.a_blocks(), self.edits,
                           lambda e: shake(f"{self.seed}/edit/{e.pos}/{e.kind}", e.length))

    def new_bytes(self) -> int:
        return sum(e.length for e in self.edits)


def random_pair(size: int) -> RandomEdits:
    """The storage scenarios' pair: 10 edits of ~0.1% each at evenly spread offsets, 8
    overwrites and 2 insertions."""
    n = 10
    length = max(1, size // 100 // n)
    edits = [Edit(int((k + 0.5) * size / n), "insert" if k in (2, 7) else "overwrite", length) for k in range(n)]
    return RandomEdits("random", size, edits, f"{n} edits of {length} B (8 overwrites, 2 insertions), evenly spread")
