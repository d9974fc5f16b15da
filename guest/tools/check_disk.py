#!/usr/bin/env python3
"""Check a disk image against the I/O stream of guest/guests/workload.c.

Replays the workload's deterministic stream (splitmix64, block choice, block
layout, CRC-32C; the exact definition is the header comment of
guest/guests/workload.c) for the first N I/Os, finds the last write to each
block, and compares each such block in IMAGE byte for byte with what that
write put there.

    check_disk.py IMAGE --rw randwrite --bs 4096 --size 4M --offset 0 --seed 7 --ios 2000
    [--rwmixread 50] [--zero-unwritten] [--image-offset BYTES]

--ios is the number of I/Os the guest issued: read_ios + write_ios from its
result line (a runtime= run), its ios= value, or last_generation + 1 (the
stream after the last write does not change the disk).  Sizes accept
k/m/g/t suffixes (powers of 1024).  --zero-unwritten also checks that every
block of the area that the stream never wrote is all zeros (a fresh image).
--image-offset: where the guest's disk starts inside IMAGE (0 for raw).

--durable D checks a disk after a crash (guest/guests/workload.c's
flush_report=1 prints "flush-done ios=D" for each completed flush): every
block written by an I/O numbered below D must hold the value of its last such
write, or of a later write to it (one the guest may have issued before the
crash: numbered below --ios, the stream's bound); blocks no write below D
touched are not checked.

Prints "ok: N blocks checked" and exits 0, or prints the first mismatch and
exits 1; exit 2 for usage errors.  Standard library only.
"""
from __future__ import annotations

import argparse
import struct
import sys

MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15
MAGIC = 0x42564B50
RW_MODES = ("read", "write", "randread", "randwrite", "randrw")


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
        table.append(c)
    return table


CRC_TABLE = _crc32c_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    """Standard CRC-32C (init ~0, final ~0); crc32c(b"123456789") == 0xE3069283."""
    crc ^= 0xFFFFFFFF
    table = CRC_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


class SplitMix64:
    """splitmix64 exactly as the guest computes it."""

    __slots__ = ("state",)

    def __init__(self, state: int):
        self.state = state & MASK64

    def next(self) -> int:
        self.state = (self.state + GAMMA) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)


def stream(rw: str, nblocks: int, seed: int, ios: int, rwmixread: int):
    """Yield (i, is_read, block) for I/O numbers 0..ios-1."""
    rng = SplitMix64(seed)
    for i in range(ios):
        if rw == "randrw":
            is_read = rng.next() % 100 < rwmixread
        else:
            is_read = rw in ("read", "randread")
        if rw.startswith("rand"):
            block = rng.next() % nblocks
        else:
            block = i % nblocks
        yield i, is_read, block


def block_bytes(bs: int, offset: int, generation: int, seed: int) -> bytes:
    """The bytes the guest writes for one block."""
    rng = SplitMix64(seed ^ offset ^ ((generation * GAMMA) & MASK64))
    words = [rng.next() for _ in range((bs - 32) // 8)]
    body = struct.pack("<QQQ", offset, generation, seed & MASK64) + struct.pack(f"<{len(words)}Q", *words)
    return struct.pack("<II", MAGIC, crc32c(body)) + body


def parse_size(text: str) -> int:
    t = text.strip().lower()
    mult = 1
    if t and t[-1] in "kmgt":
        mult = 1024 ** ("kmgt".index(t[-1]) + 1)
        t = t[:-1]
    return int(t, 0) * mult


def describe_mismatch(got: bytes, want: bytes) -> str:
    first = next(i for i in range(len(want)) if got[i] != want[i])
    magic, crc, off, gen, seed = struct.unpack_from("<IIQQQ", got)
    return (f"first differing byte {first}; found magic={magic:#x} crc={crc:#x} offset={off} "
            f"generation={gen} seed={seed}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("image")
    ap.add_argument("--rw", required=True, choices=RW_MODES)
    ap.add_argument("--bs", required=True, type=parse_size)
    ap.add_argument("--size", required=True, type=parse_size)
    ap.add_argument("--offset", default=0, type=parse_size)
    ap.add_argument("--seed", default=1, type=lambda s: int(s, 0))
    ap.add_argument("--ios", required=True, type=lambda s: int(s, 0))
    ap.add_argument("--rwmixread", default=50, type=int)
    ap.add_argument("--zero-unwritten", action="store_true")
    ap.add_argument("--image-offset", default=0, type=parse_size)
    ap.add_argument("--durable", type=lambda s: int(s, 0), metavar="D",
                    help="a crash check: the durable point of the last completed flush")
    a = ap.parse_args(argv)
    if a.durable is not None and (a.durable > a.ios or a.zero_unwritten):
        ap.error("--durable must be at most --ios, and does not go with --zero-unwritten")
    if a.bs < 512 or a.bs % 512:
        ap.error("--bs must be a multiple of 512")
    nblocks = a.size // a.bs
    if nblocks <= 0:
        ap.error("--size is smaller than --bs")
    if not 0 <= a.rwmixread <= 100:
        ap.error("--rwmixread must be 0..100")

    last_gen: dict[int, int] = {}
    later: dict[int, set] = {}      # --durable: the writes at or after D, by block
    durable = a.ios if a.durable is None else a.durable
    for i, is_read, block in stream(a.rw, nblocks, a.seed, a.ios, a.rwmixread):
        if not is_read:
            if i < durable:
                last_gen[block] = i
            else:
                later.setdefault(block, set()).add(i)

    checked = 0
    try:
        f = open(a.image, "rb")
    except OSError as e:
        print(f"error: {a.image}: {e.strerror}", file=sys.stderr)
        return 2
    with f:
        for block in sorted(last_gen):
            off = a.offset + block * a.bs
            want = block_bytes(a.bs, off, last_gen[block], a.seed)
            f.seek(a.image_offset + off)
            got = f.read(a.bs)
            if got != want and len(got) == a.bs and block in later:
                gen = struct.unpack_from("<Q", got, 16)[0]      # a later write landed?
                if gen in later[block] and got == block_bytes(a.bs, off, gen, a.seed):
                    checked += 1
                    continue
            if got != want:
                if len(got) < a.bs:
                    print(f"mismatch: block {block} offset {off}: image ends "
                          f"(read {len(got)} of {a.bs} bytes)")
                else:
                    print(f"mismatch: block {block} offset {off} (generation {last_gen[block]}): "
                          f"{describe_mismatch(got, want)}")
                return 1
            checked += 1
        if a.zero_unwritten:
            zero = bytes(a.bs)
            for block in range(nblocks):
                if block in last_gen:
                    continue
                off = a.offset + block * a.bs
                f.seek(a.image_offset + off)
                got = f.read(a.bs)
                if got != zero[:len(got)]:
                    print(f"mismatch: block {block} offset {off} was never written but is not zero")
                    return 1
                checked += 1
    print(f"ok: {checked} blocks checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
