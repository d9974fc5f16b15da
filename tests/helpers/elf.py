"""Craft minimal ELF64 images for loader tests: exact control over notes and segments."""
from __future__ import annotations

import struct

PT_LOAD, PT_NOTE = 1, 4
EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")


def note(name: bytes, ntype: int, desc: bytes) -> bytes:
    n = name + b"\0"
    pad = lambda b: b + b"\0" * (-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(n), len(desc), ntype) + pad(n) + pad(desc)


def pvh_note(entry: int, size: int = 4) -> bytes:
    return note(b"Xen", 18, entry.to_bytes(size, "little"))


def make_elf(segments: list[tuple[int, bytes, int]], notes: bytes | None = None,
             machine: int = 62, e_entry: int = 0) -> bytes:
    """segments: (paddr, file bytes, memsz). Returns the ELF image."""
    phnum = len(segments) + (1 if notes is not None else 0)
    off = EHDR.size + PHDR.size * phnum
    body = b""
    phdrs = b""
    if notes is not None:
        phdrs += PHDR.pack(PT_NOTE, 4, off + len(body), 0, 0, len(notes), len(notes), 4)
        body += notes
    for paddr, data, memsz in segments:
        body += b"\0" * (-(off + len(body)) % 16)
        phdrs += PHDR.pack(PT_LOAD, 7, off + len(body), paddr, paddr, len(data), memsz, 16)
        body += data
    ident = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    ehdr = EHDR.pack(ident, 2, machine, 1, e_entry, EHDR.size, 0, 0, EHDR.size, PHDR.size,
                     phnum, 64, 0, 0)
    return ehdr + phdrs + body


def code_elf(code: bytes, base: int = 0x100000, bss: int = 0) -> bytes:
    """A PVH ELF whose 32-bit entry is ``code`` at ``base``."""
    return make_elf([(base, code, len(code) + bss)], pvh_note(base))


# 32-bit code snippets (entered in flat protected mode, paging off)
def exit_code(value: int) -> bytes:
    """mov al, value; mov dx, 0x501; out dx, al; jmp $"""
    return bytes([0xB0, value & 0xFF, 0x66, 0xBA, 0x01, 0x05, 0xEE, 0xEB, 0xFE])


SPIN = bytes([0xEB, 0xFE])  # jmp $
