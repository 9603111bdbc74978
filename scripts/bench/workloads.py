"""Snapshot generators: each workload is a pair of snapshots, A and B (A changed the way a state
machine changes between two snapshots), produced as streams of byte blocks.

Every generator is
- deterministic: all randomness is SHAKE-128 of a seed string naming the workload, the block
  and the record, so A and B (and every run) agree byte for byte, and B is produced from the
  seeds without reading A back;
- streaming: blocks of at most a few MiB, so no snapshot is ever held in memory;
- bulk: a KV block is laid out with a handful of strided memoryview copies per 4-byte column
  (records are 124 bytes, 31 words), never a Python loop over records, and only the few
  changed records are built one by one; about 2-5 s of CPU per GiB.

The workloads:
- random (the storage scenarios): incompressible bytes; B = 8 overwrites and 2 insertions of
  0.1% each, evenly spread (~1% new bytes).
- file-edits: 64 MiB of incompressible bytes; B = 64 overwrites of 10 KiB and 8 insertions of
  1 KiB, one per 1/72 of the file at a seeded place in it (~1% new bytes).
- kv-*: the sorted dump a BTreeMap<u64, Account> state machine writes in key order: a 32-byte
  header (magic, last applied index, term, record count), then 124-byte records: 8-byte key
  (big-endian, so byte order is key order; keys 16 apart so insertions fit between), its
  16-byte text (lower-case hex of the key), and a 100-byte value laid out as a fixed-width
  serialized struct (little-endian):
      version u64 (1..16: a few bytes of entropy), updated_at u64 (ms since the epoch, within
      ~50 days of late 2023), balance u64 (below 2^32), flags u32 (0..7),
      owner [u8; 32] (random: a public key or hash, incompressible),
      label [u8; 40] (one of 256 "plan=..;region=..;tier=.." strings, NUL-padded).
  So about 40 of the 124 bytes are high-entropy and the rest counters, timestamps, zeros and
  text from a small vocabulary: a binary state that compresses some, but nowhere near JSON.
  An update rewrites a record's value as an application's update does: version + 1, a later
  updated_at, a new balance, and one time in four a new label (key, owner and flags stay).
  An insertion is a new record between two existing keys (all later bytes shift by 124).
    kv-uniform       5,000 updates of uniformly random keys + 500 insertions (openraft's
                     default policy snapshots every 5,000 logs)
    kv-uniform-500   500 updates + 500 insertions
    kv-hot           5,000 updates + 500 insertions, all in one contiguous key range of 1/64
                     of the keys (at least twice as many records as change), at a seeded place
    kv-append        5,500 new keys after the last one (an append-only log or time series)
- kv-json: the example kv node's snapshot file (examples/kv: a JSON header line
  {last_applied, last_membership}, then a ["key","value"] line per entry), keys "user/<12 digits>"
  16 apart, values a seeded mix drawn from a table of 65,536 distinct values: 60% profile
  documents stored as JSON text (so escaped quotes; names, e-mail, plan, counters, a
  timestamp), 25% session tokens ("sess:" + 32 hex digits), 15% counters. Repeats of a table
  value are far apart (a few per MiB), so compressing a chunk of tens of KiB sees no more
  redundancy than real values would give. B = 5,000 updates (another value from the table:
  lengths change, bytes shift) + 500 insertions.
"""

from __future__ import annotations

import array
import bisect
import hashlib
import itertools
import random
import struct
import sys
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterable, Iterator

MiB = 1 << 20
GiB = 1 << 30
BLOCK = 4 * MiB  # random data per block
SAMPLE = 4 * MiB  # how much of A the compressibility figures look at

A_INDEX, B_INDEX, TERM = 1000, 1001, 3


def shake(seed: str, n: int) -> bytes:
    """n deterministic pseudo-random bytes for `seed`."""
    return hashlib.shake_128(seed.encode()).digest(n)


def u32s(values: bytes) -> bytearray:
    """Little-endian u32 words, one per byte of `values`."""
    out = bytearray(4 * len(values))
    out[0::4] = values
    return out


def le32(value: int, n: int) -> bytes:
    """n little-endian u32 words, all `value`."""
    return value.to_bytes(4, "little") * n


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


def compressibility(sample: bytes, piece: int = 64 << 10) -> dict:
    """zlib level 6 of the sample, as a share of its size: whole, and cut in `piece` pieces
    compressed each on its own (what per-chunk compression could get)."""
    if not sample:
        return {}
    pieces = sum(len(zlib.compress(sample[i:i + piece], 6)) for i in range(0, len(sample), piece))
    return {"zlib_whole": round(len(zlib.compress(sample, 6)) / len(sample), 4),
            "zlib_64k": round(pieces / len(sample), 4), "sample_bytes": len(sample)}


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


def file_edits(size: int = 64 * MiB, overwrites: int = 64, overwrite_len: int = 10 << 10, inserts: int = 8,
               insert_len: int = 1 << 10) -> RandomEdits:
    """Scattered edits: the file is cut in overwrites + inserts equal slots, each gets one edit
    (which kind: a seeded shuffle) at a seeded offset inside its slot."""
    rng = random.Random("file-edits")
    kinds = ["overwrite"] * overwrites + ["insert"] * inserts
    rng.shuffle(kinds)
    slot = size // len(kinds)
    edits = []
    for k, kind in enumerate(kinds):
        length = overwrite_len if kind == "overwrite" else insert_len
        if slot <= overwrite_len:
            raise ValueError(f"file-edits: {size} B is too small for {len(kinds)} edits")
        edits.append(Edit(k * slot + rng.randrange(slot - overwrite_len), kind, length))
    return RandomEdits("file-edits", size, edits,
                       f"{overwrites} overwrites of {overwrite_len >> 10} KiB and {inserts} insertions of "
                       f"{insert_len} B at scattered places")


# --------------------------------------------------------------------------------------------
# sorted binary KV dump


REC = 124  # 8-byte key + 16-byte key text + 100-byte value
WORDS = REC // 4
STRIDE = 16  # key distance: inserted keys take key + STRIDE // 2
KV_BLOCK_RECS = 2048  # ~250 KiB: small enough for the strided copies to stay in cache
HEADER = struct.Struct("<8sQQQ")  # magic, last applied index, term, record count
TS_HI = 0x18C  # updated_at's high word: 0x18C << 32 ms is November 2023
RAND_PER_REC = 43  # random bytes a record's fields take (see kv_block)

# version 1..16, mostly small; flags 0..7, mostly 0 or 1
VERSION_T = bytes(1 + min(15, (b * b) >> 12) for b in range(256))
FLAGS_T = bytes((0, 0, 0, 1, 1, 2, 4, 7)[b & 7] for b in range(256))


def _labels() -> list[bytes]:
    rng = random.Random("kv-labels")
    plans = ["free", "basic", "pro", "team", "enterprise"]
    regions = ["eu-west-1", "eu-central-1", "us-east-1", "us-west-2", "ap-south-1", "sa-east-1"]
    out = []
    for _ in range(256):
        text = f"plan={rng.choice(plans)};region={rng.choice(regions)};tier={rng.randrange(1, 5)}"
        if rng.random() < 0.5:
            text += f";ref={rng.randrange(10**5):05d}"
        out.append(text.encode()[:40].ljust(40, b"\0"))
    return out


LABELS = _labels()


def _put(d: memoryview, word: int, src, width: int) -> None:
    """Column `src` (width words per record) into word `word` of each record of view `d`."""
    s = memoryview(src).cast("B").cast("I")
    for j in range(width):
        d[word + j::WORDS] = s[j::width]


def kv_block(seed: str, first: int, n: int) -> bytearray:
    """Records first .. first+n-1 (record i has key (i + 1) * STRIDE), laid out column by column."""
    buf = bytearray(n * REC)
    d = memoryview(buf).cast("I")
    keys = array.array("Q", range((first + 1) * STRIDE, (first + n + 1) * STRIDE, STRIDE))
    if sys.byteorder == "little":
        keys.byteswap()  # big-endian: byte order is key order
    kb = keys.tobytes()
    _put(d, 0, kb, 2)
    _put(d, 2, kb.hex().encode(), 4)
    r = shake(f"{seed}/kv/{first}", RAND_PER_REC * n)
    _put(d, 6, u32s(r[0:n].translate(VERSION_T)), 1)  # version (high word 0)
    _put(d, 8, r[n:5 * n], 1)  # updated_at low word
    _put(d, 9, le32(TS_HI, n), 1)  # updated_at high word
    _put(d, 10, r[5 * n:9 * n], 1)  # balance (high word 0)
    _put(d, 12, u32s(r[9 * n:10 * n].translate(FLAGS_T)), 1)  # flags
    _put(d, 13, r[10 * n:42 * n], 8)  # owner
    _put(d, 21, b"".join(map(LABELS.__getitem__, r[42 * n:43 * n])), 10)  # label
    return buf


def kv_record(seed: str, key: int) -> bytes:
    """One new record (an insertion), the same layout as kv_block's."""
    r = shake(f"{seed}/new/{key}", RAND_PER_REC)
    kb = key.to_bytes(8, "big")
    value = struct.pack("<QIIIII32s40s", VERSION_T[r[0]], int.from_bytes(r[1:5], "little"), TS_HI,
                        int.from_bytes(r[5:9], "little"), 0, FLAGS_T[r[9]], r[10:42], LABELS[r[42]])
    return kb + kb.hex().encode() + value


def kv_update(buf: bytearray, off: int, seed: str, index: int) -> None:
    """Rewrites the value of the record at `off` as an update does (see the module doc)."""
    r = shake(f"{seed}/upd/{index}", 9)
    v = off + 24
    buf[v] = min(255, buf[v] + 1)  # version
    ts = int.from_bytes(buf[v + 8:v + 16], "little") + 1 + int.from_bytes(r[0:3], "little")
    buf[v + 8:v + 16] = ts.to_bytes(8, "little")  # later updated_at
    buf[v + 16:v + 20] = r[3:7]  # balance
    if r[7] < 64:
        buf[v + 60:v + 100] = LABELS[r[8]]


class KvDump(Workload):
    def __init__(self, name: str, size: int, *, updates: int = 0, inserts: int = 0, appends: int = 0,
                 hot: bool = False, seed: str = "kv"):
        self.name, self.size, self.seed = name, size, seed
        self.n = max(1, (size - HEADER.size) // REC)
        rng = random.Random(f"{seed}/{name}/changes")
        lo, span = 0, self.n
        if hot:
            span = min(self.n, max(self.n // 64, 2 * (updates + inserts)))
            lo = rng.randrange(self.n - span + 1)
        self.updates = sorted(rng.sample(range(lo, lo + span), min(updates, span)))
        self.inserts = sorted(rng.sample(range(lo, lo + span), min(inserts, span)))
        self.appends = appends
        self.update_set = set(self.updates)
        self.a_text = (f"sorted KV dump, {self.n:,} records of {REC} B (8 B key, 16 B key text, 100 B value: "
                       "counters, timestamp, 32 B random owner, label text)")
        where = (f"in one key range of {span:,} records ({100 * span / self.n:.1f}% of the keys)" if hot
                 else "at uniformly random keys")
        parts = []
        if updates:
            parts.append(f"{len(self.updates):,} updates")
        if inserts:
            parts.append(f"{len(self.inserts):,} insertions")
        self.b_text = (" + ".join(parts) + f" {where}") if parts else ""
        if appends:
            self.b_text = (self.b_text + "; " if self.b_text else "") + f"{appends:,} new keys appended after the last"

    def header(self, index: int, count: int) -> bytes:
        return HEADER.pack(b"SRKVDUMP", index, TERM, count)

    def a_blocks(self) -> Iterator[bytes]:
        yield self.header(A_INDEX, self.n)
        for first in range(0, self.n, KV_BLOCK_RECS):
            yield kv_block(self.seed, first, min(KV_BLOCK_RECS, self.n - first))

    def b_blocks(self) -> Iterator[bytes]:
        yield self.header(B_INDEX, self.n + len(self.inserts) + self.appends)
        for first in range(0, self.n, KV_BLOCK_RECS):
            n = min(KV_BLOCK_RECS, self.n - first)
            buf = kv_block(self.seed, first, n)
            lo = bisect.bisect_left(self.updates, first)
            hi = bisect.bisect_left(self.updates, first + n)
            for i in self.updates[lo:hi]:
                kv_update(buf, (i - first) * REC, self.seed, i)
            lo = bisect.bisect_left(self.inserts, first)
            hi = bisect.bisect_left(self.inserts, first + n)
            view, cut = memoryview(buf), 0
            for i in self.inserts[lo:hi]:  # a new key after record i
                end = (i - first + 1) * REC
                yield view[cut:end]
                yield kv_record(self.seed, (i + 1) * STRIDE + STRIDE // 2)
                cut = end
            yield view[cut:]
        for first in range(self.n, self.n + self.appends, KV_BLOCK_RECS):
            yield kv_block(self.seed, first, min(KV_BLOCK_RECS, self.n + self.appends - first))


# --------------------------------------------------------------------------------------------
# the kv example's JSON state


JSON_BLOCK_RECS = 4096
JSON_TABLE = 1 << 16


def _json_values() -> list[bytes]:
    """The value table: serde_json string bodies, each followed by the closing quote, the
    record's closing bracket and its newline."""
    rng = random.Random("kv-json-values")
    first = ["ana", "bruno", "chen", "dara", "emil", "fatima", "goran", "hana", "ivan", "julia", "kofi", "lena",
             "mateo", "nina", "omar", "priya", "quinn", "rosa", "sven", "tariq", "uma", "vera", "wei", "yusuf"]
    last = ["silva", "novak", "kim", "okafor", "müller", "garcia", "rossi", "tanaka", "dubois", "kowalski",
            "nielsen", "haddad", "ivanova", "mensah", "larsen", "costa"]
    plans = ["free", "basic", "pro", "team"]
    out = []
    for _ in range(JSON_TABLE):
        kind = rng.random()
        if kind < 0.60:
            f, la = rng.choice(first), rng.choice(last)
            doc = (f'{{\\"name\\":\\"{f.title()} {la.title()}\\",\\"email\\":\\"{f}.{la}{rng.randrange(100)}'
                   f'@example.org\\",\\"plan\\":\\"{rng.choice(plans)}\\",\\"visits\\":{rng.randrange(10**5)},'
                   f'\\"last_seen\\":\\"2024-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}T'
                   f'{rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d}Z\\"}}')
        elif kind < 0.85:
            doc = "sess:" + rng.randbytes(16).hex()
        else:
            doc = str(rng.randrange(10 ** rng.randrange(1, 8)))
        out.append(doc.encode() + b'"]\n')
    return out


JSON_VALUES = _json_values()
JSON_KEY = b'["user/%012d","'


def json_header(index: int) -> bytes:
    """The header line: last_applied, a three-voter membership."""
    nodes = ",".join(f'"{i}":{{"addr":"127.0.0.1:{21000 + i}"}}' for i in (1, 2, 3))
    return (f'{{"last_applied":{{"leader_id":{{"term":{TERM},"node_id":1}},"index":{index}}},'
            f'"last_membership":{{"log_id":{{"leader_id":{{"term":1,"node_id":1}},"index":3}},'
            f'"membership":{{"configs":[[1,2,3]],"nodes":{{{nodes}}}}}}}}}\n').encode()


def _table_indexes(seed: str, n: int) -> array.array:
    a = array.array("H", shake(seed, 2 * n))
    if sys.byteorder == "big":
        a.byteswap()
    return a


class JsonState(Workload):
    def __init__(self, name: str, size: int, *, updates: int, inserts: int, seed: str = "kv-json"):
        self.name, self.size, self.seed = name, size, seed
        mean = sum(map(len, JSON_VALUES)) / len(JSON_VALUES) + len(JSON_KEY % 0)
        self.n = max(1, int((size - len(json_header(A_INDEX))) / mean))
        rng = random.Random(f"{seed}/{name}/changes")
        self.updates = sorted(rng.sample(range(self.n), min(updates, self.n)))
        self.inserts = sorted(rng.sample(range(self.n), min(inserts, self.n)))
        self.a_text = (f"the kv example's JSON snapshot, {self.n:,} keys (values: 60% profile documents as JSON "
                       "text, 25% session tokens, 15% counters)")
        self.b_text = f"{len(self.updates):,} updates (new values) + {len(self.inserts):,} insertions at random keys"

    def _blocks(self, index: int, changed: bool) -> Iterator[bytes]:
        yield json_header(index)
        last = None
        for first in range(0, self.n, JSON_BLOCK_RECS):
            n = min(JSON_BLOCK_RECS, self.n - first)
            keys = map(JSON_KEY.__mod__, range((first + 1) * STRIDE, (first + n + 1) * STRIDE, STRIDE))
            vals = map(JSON_VALUES.__getitem__, _table_indexes(f"{self.seed}/json/{first}", n))
            flat = list(itertools.chain.from_iterable(zip(keys, vals)))
            if changed:
                lo = bisect.bisect_left(self.updates, first)
                hi = bisect.bisect_left(self.updates, first + n)
                for i in self.updates[lo:hi]:
                    j = int.from_bytes(shake(f"{self.seed}/upd/{i}", 2), "little")
                    flat[2 * (i - first) + 1] = JSON_VALUES[j]
                lo = bisect.bisect_left(self.inserts, first)
                hi = bisect.bisect_left(self.inserts, first + n)
                for i in reversed(self.inserts[lo:hi]):  # from the back: positions stay valid
                    j = int.from_bytes(shake(f"{self.seed}/new/{i}", 2), "little")
                    pos = 2 * (i - first + 1)
                    flat[pos:pos] = [JSON_KEY % ((i + 1) * STRIDE + STRIDE // 2), JSON_VALUES[j]]
            if last is not None:
                yield last
            last = b"".join(flat)
        yield last

    def a_blocks(self) -> Iterator[bytes]:
        return self._blocks(A_INDEX, False)

    def b_blocks(self) -> Iterator[bytes]:
        return self._blocks(B_INDEX, True)


# --------------------------------------------------------------------------------------------


REAL_WORKLOADS: dict[str, Callable[[int], Workload]] = {
    "kv-uniform": lambda size: KvDump("kv-uniform", size, updates=5000, inserts=500),
    "kv-uniform-500": lambda size: KvDump("kv-uniform-500", size, updates=500, inserts=500),
    "kv-hot": lambda size: KvDump("kv-hot", size, updates=5000, inserts=500, hot=True),
    "kv-append": lambda size: KvDump("kv-append", size, appends=5500),
    "kv-json": lambda size: JsonState("kv-json", size, updates=5000, inserts=500),
    # Always 64 MiB: the size this workload was defined at.
    "file-edits": lambda size: file_edits(),
}


# --------------------------------------------------------------------------------------------
# self-check: python3 scripts/bench/workloads.py [SIZE_MIB]


def check(size: int = 4 * MiB) -> None:
    """Asserts what the module doc promises, on small instances: A and B are deterministic, KV
    records are sorted with matching key text and header count, B changes exactly the planned
    records, the JSON state parses and holds the planned keys, byte edits land where planned.
    Then times A and B of each workload."""
    import json
    import time

    def both(w: Workload) -> tuple[bytes, bytes]:
        a, b = b"".join(map(bytes, w.a_blocks())), b"".join(map(bytes, w.b_blocks()))
        assert a == b"".join(map(bytes, w.a_blocks())) and b == b"".join(map(bytes, w.b_blocks())), w.name
        return a, b

    def records(data: bytes) -> dict[bytes, bytes]:
        magic, _index, _term, count = HEADER.unpack_from(data)
        assert magic == b"SRKVDUMP" and len(data) == HEADER.size + count * REC, (magic, count, len(data))
        recs = [data[HEADER.size + i * REC:HEADER.size + (i + 1) * REC] for i in range(count)]
        keys = [r[:8] for r in recs]
        assert keys == sorted(keys) and len(set(keys)) == len(keys), "keys sorted and unique"
        assert all(r[8:24] == r[:8].hex().encode() for r in recs), "key text"
        return {r[:8]: r for r in recs}

    for name, make in REAL_WORKLOADS.items():
        w = make(size)
        a, b = both(w)
        if isinstance(w, KvDump):
            ra, rb = records(a), records(b)
            changed = [k for k in ra if ra[k] != rb[k]]
            assert len(changed) == len(w.updates), (name, len(changed))
            assert all(ra[k][:24] == rb[k][:24] and ra[k][52:84] == rb[k][52:84] for k in changed), "key, owner kept"
            assert len(rb) - len(ra) == len(w.inserts) + w.appends and set(ra) <= set(rb), name
        elif isinstance(w, JsonState):
            ja, jb = json.loads(a), json.loads(b)
            assert ja["last_applied"]["index"] == A_INDEX and jb["last_applied"]["index"] == B_INDEX
            da, db = ja["data"], jb["data"]
            assert list(da) == sorted(da) and list(db) == sorted(db) and len(da) == w.n, name
            assert len(db) - len(da) == len(w.inserts) and set(da) <= set(db), name
            # an update may draw the value it replaces: 1 in 65,536
            assert sum(da[k] != db[k] for k in da) >= len(w.updates) - 2, name
        else:
            assert len(b) - len(a) == sum(e.length for e in w.edits if e.kind == "insert"), name
            shift = 0
            for e in sorted(w.edits, key=lambda e: e.pos):
                at = e.pos + shift
                assert b[at:at + e.length] != a[e.pos:e.pos + e.length], (name, e)
                shift += e.length if e.kind == "insert" else 0
        print(f"ok {name}: A {len(a):,} B, B {len(b):,} B; {w.b_text}")

    class Null:
        def write(self, _b) -> None:
            pass

    for name, make in REAL_WORKLOADS.items():
        w = make(64 * MiB)
        t0 = time.process_time()
        n = write_stream(w.a_blocks(), Null(), 0)[0] + write_stream(w.b_blocks(), Null(), 0)[0]
        cpu = time.process_time() - t0
        print(f"{name}: A and B at {w.size >> 20} MiB in {cpu:.2f} CPU-s ({n / MiB / cpu:.0f} MiB/s)")


if __name__ == "__main__":
    check(int(sys.argv[1]) * MiB if len(sys.argv) > 1 else 4 * MiB)
