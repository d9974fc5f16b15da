"""Write the seed inputs under tests/fuzz/seeds/ (committed; run again to remake them).

    python -m tests.fuzz.make_seeds [TARGET...]

qcow2 seeds are small images made by qemu-img and qemu-io with every feature
the block layer knows (v2 and v3, backing files raw and qcow2, compressed
clusters zlib and zstd, extended L2, lazy refcounts, an external data file,
internal snapshots, zero clusters, refcount widths); the files they name sit in
seeds/qcow2-files/. The other targets' seeds are built here from the formats.
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tempfile

from tests.fuzz.harness import SEEDS


def _run(*cmd, cwd):
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def _io(cwd, image, *ops, fmt="qcow2"):
    args = ["qemu-io", "-f", fmt]
    for op in ops:
        args += ["-c", op]
    _run(*args, image, cwd=cwd)


def qcow2(out: str) -> None:
    files = os.path.join(SEEDS, "qcow2-files")
    with tempfile.TemporaryDirectory() as d:
        def create(name, opts, size="1M", *extra):
            _run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, *extra, name, size,
                 cwd=d)
        _run("qemu-img", "create", "-q", "-f", "raw", "base.raw", "256K", cwd=d)
        _io(d, "base.raw", "write -P 0x11 0 64k", "write -P 0x22 128k 4k", fmt="raw")
        create("base.qcow2", "cluster_size=4096", "256K")
        _io(d, "base.qcow2", "write -P 0x33 4k 8k", "write -z 64k 4k")
        create("v2.qcow2", "compat=0.10,cluster_size=4096")
        _io(d, "v2.qcow2", "write -P 0x44 0 12k", "write -P 0x45 512k 4k", "write -z 8k 4k")
        create("v3.qcow2", "compat=1.1,cluster_size=4096,refcount_bits=16")
        _io(d, "v3.qcow2", "write -P 0x46 0 16k", "write -z 4k 4k", "discard 12k 4k",
            "write -P 0x47 900k 4k")
        create("refcount1.qcow2", "cluster_size=4096,refcount_bits=1")
        _io(d, "refcount1.qcow2", "write -P 0x48 8k 8k")
        create("refcount64.qcow2", "cluster_size=4096,refcount_bits=64")
        _io(d, "refcount64.qcow2", "write -P 0x49 8k 8k")
        create("backing-raw.qcow2", "cluster_size=4096", "256K", "-b", "base.raw", "-F", "raw")
        _io(d, "backing-raw.qcow2", "write -P 0x50 4k 4k", "write -z 128k 4k")
        create("backing-qcow2.qcow2", "cluster_size=4096", "256K", "-b", "base.qcow2",
               "-F", "qcow2")
        _io(d, "backing-qcow2.qcow2", "write -P 0x51 8k 2k")
        _io(d, "base.raw", "write -P 0x52 192k 32k", fmt="raw")
        _run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096",
             "base.raw", "compressed-zlib.qcow2", cwd=d)
        _run("qemu-img", "convert", "-c", "-O", "qcow2", "-o",
             "cluster_size=4096,compression_type=zstd", "base.raw", "compressed-zstd.qcow2",
             cwd=d)
        create("extended-l2.qcow2", "cluster_size=16384,extended_l2=on")
        _io(d, "extended-l2.qcow2", "write -P 0x53 0 512", "write -P 0x54 3k 1k",
            "write -z 16k 2k")
        create("lazy-refcounts.qcow2", "cluster_size=4096,lazy_refcounts=on")
        _io(d, "lazy-refcounts.qcow2", "write -P 0x55 0 8k")
        create("data-file.qcow2", "cluster_size=4096,data_file=data.raw")
        _io(d, "data-file.qcow2", "write -P 0x56 0 8k", "write -P 0x57 64k 4k")
        create("data-file-raw.qcow2", "cluster_size=4096,data_file=data.raw,data_file_raw=on")
        create("snapshots.qcow2", "cluster_size=4096")
        _io(d, "snapshots.qcow2", "write -P 0x58 0 8k")
        _run("qemu-img", "snapshot", "-c", "one", "snapshots.qcow2", cwd=d)
        _io(d, "snapshots.qcow2", "write -P 0x59 4k 8k")
        _run("qemu-img", "snapshot", "-c", "two", "snapshots.qcow2", cwd=d)
        # data.raw as data-file.qcow2 left it (data-file-raw.qcow2 was made before it)
        shutil.rmtree(files, ignore_errors=True)
        os.makedirs(files)
        for name in ("base.raw", "base.qcow2", "data.raw"):
            shutil.copy(os.path.join(d, name), files)
        for name in sorted(os.listdir(d)):
            if name.endswith(".qcow2") and name != "base.qcow2":
                shutil.copy(os.path.join(d, name), os.path.join(out, name))
        shutil.copy(os.path.join(d, "base.qcow2"), os.path.join(out, "base.qcow2"))


def disk(out: str) -> None:
    seeds = {
        "bare": "a.qcow2",
        "format": "file=a.qcow2,format=qcow2,cache=none,aio=python,readonly=on",
        "dotted": "driver=qcow2,file.driver=file,file.filename=a.qcow2,"
                  "backing.file.filename=b.raw,backing.driver=raw",
        "no-backing": "file=a.qcow2,backing=,l2-cache-size=64K,node-name=root",
        "raw-window": "file=b.raw,format=raw,offset=4096,size=65536,discard=ignore",
        "throttle": "file=b.raw,throttling.iops-total=100,throttling.iops-total-max=200,"
                    "throttling.bps-read=1M,throttling.group=g",
        "device": "file=b.raw,transport=pci,queues=4,iothread=queue,poll-max-ns=0,"
                  "irq-coalesce-ns=1000,serial=x,,y,detect-zeroes=unmap",
        "json": 'json:{"driver":"qcow2","file":{"driver":"file","filename":"a.qcow2"},'
                '"backing":{"driver":"raw","file.filename":"b.raw"}}',
        "json-in-file": 'file=json:{"driver":"raw",,"file.filename":"b.raw"}',
        "file-locking": "file=a.qcow2,file.locking=off,file.aio=threads",
    }
    for name, text in seeds.items():
        with open(os.path.join(out, name), "w") as f:
            f.write(text)


def _pvh_elf() -> bytes:
    """An ELF64 with one PT_LOAD at 1 MiB and the Xen PVH entry note."""
    note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", 0x100000)
    code = b"\xf4" * 16
    ehdr_size, phdr_size = 64, 56
    note_off = ehdr_size + 2 * phdr_size
    code_off = note_off + len(note)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + bytes(9), 2, 62, 1,
                       0x100000, ehdr_size, 0, 0, ehdr_size, phdr_size, 2, 64, 0, 0)
    load = struct.pack("<IIQQQQQQ", 1, 5, code_off, 0x100000, 0x100000, len(code), 0x2000,
                       0x1000)
    pnote = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(note), len(note), 4)
    return ehdr + load + pnote + note + code


def _elf32() -> bytes:
    note = struct.pack("<III", 4, 8, 18) + b"Xen\0" + struct.pack("<Q", 0x100000)
    ehdr = struct.pack("<16sHHIIIIIHHHHHH", b"\x7fELF\x01\x01\x01" + bytes(9), 2, 3, 1,
                       0x100000, 52, 0, 0, 52, 32, 2, 40, 0, 0)
    note_off = 52 + 64
    load = struct.pack("<IIIIIIII", 1, note_off + len(note), 0x100000, 0x100000, 8, 16, 5, 16)
    pnote = struct.pack("<IIIIIIII", 4, note_off, 0, 0, len(note), len(note), 4, 4)
    return ehdr + load + pnote + note + b"\xf4" * 8


def _bzimage(version=0x020F, relocatable=1) -> bytes:
    """A setup header (boot.rst) and a small protected-mode part."""
    setup_sects = 4
    setup = bytearray((setup_sects + 1) * 512)
    pm = b"\x90" * 0x1000
    setup[0x1F1] = setup_sects
    struct.pack_into("<I", setup, 0x1F4, len(pm) // 16)
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x200:0x202] = bytes([0xEB, 0x26C - 0x202])
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = 0x01                                      # LOADED_HIGH
    struct.pack_into("<I", setup, 0x214, 0x100000)
    struct.pack_into("<I", setup, 0x22C, 0x7FFFFFFF)         # initrd_addr_max
    struct.pack_into("<I", setup, 0x230, 0x200000)           # kernel_alignment
    setup[0x234] = relocatable
    struct.pack_into("<H", setup, 0x236, 0x01)               # XLF_KERNEL_64
    struct.pack_into("<I", setup, 0x238, 2047)               # cmdline_size
    struct.pack_into("<Q", setup, 0x258, 0x1000000)          # pref_address
    struct.pack_into("<I", setup, 0x260, 0x800000)           # init_size
    return bytes(setup) + pm


def boot(out: str) -> None:
    seeds = {"pvh64.elf": _pvh_elf(), "pvh32.elf": _elf32(), "bzimage": _bzimage(),
             "bzimage-fixed": _bzimage(version=0x020C, relocatable=0)}
    for name, data in seeds.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)


def queue(out: str) -> None:
    """Two chains (one direct, one through the indirect table at TABLE), published,
    and a device that pops, completes and asks whether to notify."""
    from pykvm.memory import GuestMemory
    from tests.fuzz.fuzz_queue import RAM, TABLE, TABLE_BYTES
    from tests.helpers.mock_virtq import MockVirtq
    nxt, wr, ind = 1, 2, 4
    ops = bytes([0, 0, 0, 1, 0, 17, 3, 1, 0, 255, 3, 2 | 0x80, 4, 1, 0])
    mem = GuestMemory(RAM, hugepages=False)
    try:
        for name, log2, flags, start in (("plain", 2, 0, 0), ("event-idx-indirect", 3, 24, 65534),
                                         ("indirect", 4, 16, 7)):
            size = 1 << log2
            mem.fill(0, RAM, 0)
            drv = MockVirtq(mem, size=size, start_idx=start)
            drv.write_desc(0, 0x40000, 16, nxt, 1)
            drv.write_desc(1, 0x41000, 512, nxt | wr, 2)
            drv.write_desc(2, 0x42000, 1, wr, 0)
            drv.write_desc(3, TABLE, 48, ind, 0)
            drv.write_table(TABLE, [(0x43000, 16, nxt, 1), (0x44000, 4096, nxt | wr, 2),
                                    (0x45000, 1, wr, 0)])
            drv.write_avail_entry(start, 0)
            drv.write_avail_entry(start + 1, 3)
            drv.set_avail_idx((start + 2) & 0xFFFF)
            drv.set_used_event((start + 1) & 0xFFFF)
            data = (bytes([log2 | flags]) + struct.pack("<H", start)
                    + mem.read(drv.desc_table, 16 * size) + mem.read(drv.avail_ring, 6 + 2 * size)
                    + mem.read(TABLE, TABLE_BYTES) + ops)
            with open(os.path.join(out, name), "wb") as f:
                f.write(data)
    finally:
        mem.close()


def vhost_user(out: str) -> None:
    """A front-end's start (as tests/helpers/vhost_user_frontend.py makes it), a
    config read, a stop and a reset; and the same start with an inflight region."""
    from pykvm.virtio.transport import vhost_user as V
    none, eventfd, memfd = 0, 1, 2
    ua = 0x7F00_0000_0000
    q = 128

    def msg(request, payload=b"", fds=none, flags=V.VERSION):
        return bytes([fds]) + V.HEADER.pack(request, flags, len(payload)) + payload

    start = (msg(V.GET_FEATURES) + msg(V.SET_OWNER) + msg(V.GET_PROTOCOL_FEATURES)
             + msg(V.SET_PROTOCOL_FEATURES, V.U64.pack(V.PF_MQ | V.PF_CONFIG | V.PF_REPLY_ACK))
             + msg(V.GET_QUEUE_NUM)
             + msg(V.SET_FEATURES, V.U64.pack((1 << 32) | (1 << 28) | (1 << 29)
                                              | V.F_PROTOCOL_FEATURES))
             + msg(V.SET_MEM_TABLE, struct.pack("=II", 1, 0) + V.REGION.pack(0, 1 << 20, ua, 0),
                   memfd, V.VERSION | V.FLAG_NEED_REPLY))
    ring = (msg(V.SET_VRING_NUM, V.STATE.pack(0, q)) + msg(V.SET_VRING_BASE, V.STATE.pack(0, 0))
            + msg(V.SET_VRING_ADDR, V.ADDR.pack(0, 0, ua + 0x1000, ua + 0x2000, ua + 0x1800, 0))
            + msg(V.SET_VRING_KICK, V.U64.pack(0), eventfd)
            + msg(V.SET_VRING_CALL, V.U64.pack(0), eventfd)
            + msg(V.SET_VRING_ENABLE, V.STATE.pack(0, 1)))
    end = (msg(V.GET_CONFIG, V.CONFIG_HDR.pack(0, 60, 0) + bytes(60))
           + msg(V.GET_VRING_BASE, V.STATE.pack(0, 0)) + msg(V.RESET_DEVICE))
    inflight = (msg(V.GET_INFLIGHT_FD, V.INFLIGHT.pack(0, 0, 1, q))
                + msg(V.SET_INFLIGHT_FD, V.INFLIGHT.pack(V.inflight_queue_bytes(q), 0, 1, q),
                      memfd))
    for name, data in (("start", start + ring + end), ("inflight", start + inflight + ring + end),
                       ("no-mem", msg(V.GET_FEATURES) + ring)):
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)


def blk(out: str) -> None:
    """One request of each type, good and bad, in fuzz_blk.py's layout."""
    def req(rtype, flags, sector, status_len, bufs):
        data = bytes([rtype, flags]) + struct.pack("<Q", sector) + bytes([status_len])
        for writable, length, content in bufs:
            data += struct.pack("<H", length) + bytes([writable]) + content
        return data
    seg = struct.Struct("<QII").pack
    # rtype: an index into fuzz_blk.TYPES (IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES, 99)
    seeds = {"read": req(0, 0, 3, 1, [(1, 4096, b"")]),
             "write": req(1, 0, 9, 1, [(0, 1024, b"\x5a" * 1024)]),
             "write-indirect": req(1, 2, 9, 1, [(0, 512, b"\x11" * 512), (0, 512, b"\x22" * 512)]),
             "flush": req(2, 0, 0, 1, []),
             "get-id": req(3, 0, 0, 1, [(1, 20, b"")]),
             "discard": req(4, 0, 0, 1, [(0, 16, seg(8, 8, 0))]),
             "write-zeroes": req(5, 0, 0, 1, [(0, 16, seg(32, 4, 1))]),
             "unknown": req(6, 0, 0, 1, [(1, 4, b"")]),
             "header-with-data": req(1, 4, 12, 1, [(0, 512, b"\x33" * 512)]),
             "past-end": req(0, 0, 2047, 1, [(1, 1024, b"")]),
             "no-status": req(0, 0, 0, 0, [(1, 512, b"")])}
    for name, data in seeds.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)


def nbd_export(out: str) -> None:
    """Client sessions in fuzz_nbd_export.py's operations: fixed newstyle with
    NBD_OPT_GO (structured replies, both metadata contexts) and every command,
    on each export; NBD_OPT_EXPORT_NAME with simple replies; every option; and
    the broken ones (refused flags, a bad magic, oversized lengths, past the end,
    an option too long, the stream cut inside a write)."""
    def flags(f=3):
        return bytes([0, f])

    def opt(o, b=0, extra=b""):        # o: an index into OPTIONS (9: a u32 follows)
        return bytes([1, o, b]) + extra

    def req(c, f=0, o=0, ln=3, extra=b""):   # c: COMMANDS, o: OFFSETS, ln: LENGTHS
        return bytes([2, c, f, o, ln]) + extra
    READ, WRITE, DISC, FLUSH, TRIM, ZERO, STATUS, UNKNOWN = range(8)
    EXPORT_NAME, ABORT, LIST, STARTTLS, INFO, GO, STRUCTURED, LIST_META, SET_META = range(9)
    pump, eof = bytes([5]), bytes([6])
    go = (flags() + opt(STRUCTURED) + opt(SET_META, 4, bytes([0, 1]))
          + opt(GO, 6, bytes([0, 1, 2])))
    commands = (req(READ) + req(WRITE, 0, 2, 2) + req(WRITE, 1, 1, 3) + req(FLUSH)
                + req(TRIM, 0, 2, 3) + req(ZERO, 0, 2, 3) + req(ZERO, 2, 3, 3)
                + req(ZERO, 0x10, 3, 4) + req(STATUS, 0, 0, 6) + req(STATUS, 8, 0, 6)
                + pump + req(READ, 0, 0, 5) + req(READ, 4, 0, 5) + req(READ, 0, 3, 4)
                + req(READ, 1, 2, 2) + pump + req(UNKNOWN) + req(READ, 0x20, 0, 3))
    simple = flags(1) + opt(EXPORT_NAME)
    seeds = {
        "go-raw": bytes([0]) + go + commands + req(DISC),
        "go-qcow2": bytes([1]) + go + commands + req(DISC),
        "go-read-only": bytes([2]) + go + commands + req(DISC),
        "export-name": bytes([0]) + simple + commands + req(STATUS) + req(READ, 4) + req(DISC),
        "export-name-no-zeroes": bytes([1]) + flags(3) + opt(EXPORT_NAME) + commands,
        "options": (bytes([0]) + flags() + opt(LIST) + opt(LIST, 0x81, b"x") + opt(STARTTLS)
                    + opt(INFO, 7, bytes([0, 1, 2])) + opt(INFO, 0) + opt(LIST_META)
                    + opt(STRUCTURED) + opt(STRUCTURED) + opt(LIST_META, 6, bytes([2, 3, 4]))
                    + opt(LIST_META, 1) + opt(SET_META, 2, bytes([5]))
                    + opt(9, 0, b"\0\0\0\x63") + opt(GO, 0x40, b"\0\0\0\x02")
                    + pump + opt(ABORT) + req(READ)),
        "go-then-garbage": bytes([0]) + go + req(READ) + bytes([4]) + req(READ),
        "raw-garbage": bytes([0]) + go + req(WRITE, 0, 0, 3) + bytes([3, 8]) + b"garbage!"
                       + req(READ),
        "oversized": (bytes([0]) + go + req(READ, 0, 0, 7) + req(READ, 0, 0, 8)
                      + req(WRITE, 0, 0, 8) + req(READ, 0, 9, 9, struct.pack(">Q", 1 << 40)
                                                  + struct.pack(">I", 0xFFFFFFF0))
                      + req(READ, 0, 6, 3) + req(TRIM, 0, 7, 3) + req(STATUS, 0, 8, 3)
                      + req(8, 0x80, 0, 3, b"\x09" + b"\xff\xff") + req(READ)),
        "refused": bytes([0]) + flags(0) + opt(GO),
        "bad-flags": bytes([0]) + bytes([0, 0x80]) + b"\0\0\0\x07" + opt(GO),
        "option-too-long": bytes([0]) + flags() + opt(LIST, 0x40, b"\x7f\xff\xff\xff"),
        "cut-in-write": bytes([0]) + go + req(WRITE, 0, 0, 6)[:5] + eof + b"\x00" * 8,
        "cut-in-handshake": bytes([0]) + flags() + bytes([3, 9]) + b"IHAVEOPT\0",
    }
    for name, data in seeds.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)


SEED_MAKERS = {"qcow2": qcow2, "disk": disk, "boot": boot, "queue": queue,
               "vhost_user": vhost_user, "blk": blk, "nbd_export": nbd_export}


def main(argv) -> None:
    for name in argv or sorted(SEED_MAKERS):
        out = os.path.join(SEEDS, name)
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        SEED_MAKERS[name](out)
        print(f"{name}: {len(os.listdir(out))} seeds, "
              f"{sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))} bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
