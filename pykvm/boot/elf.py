"""Just enough ELF to boot: the header, program headers and notes, bounds-checked.

The loader needs a dozen fields, so it reads them with ``struct`` rather than
importing pyelftools, whose import alone costs ~30 ms: half of a whole QEMU
microvm boot (see bench). pyelftools still reads symbol tables for fault
reports, where time does not matter, and the tests check this reader against
it on every guest we build. Everything here treats the file as hostile: each
offset and count is checked against the file size before use.
"""
from __future__ import annotations

import struct

ELF_MAGIC = b"\x7fELF"
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB = 1
EM_386, EM_X86_64 = 3, 62
PT_LOAD, PT_NOTE = 1, 4
MAX_PHNUM = 4096

_EHDR64 = struct.Struct("<16sHHIQQQIHHHHHH")
_EHDR32 = struct.Struct("<16sHHIIIIIHHHHHH")
_PHDR64 = struct.Struct("<IIQQQQQQ")   # type flags offset vaddr paddr filesz memsz align
_PHDR32 = struct.Struct("<IIIIIIII")   # type offset vaddr paddr filesz memsz flags align


class ElfFormatError(ValueError):
    pass


class ProgramHeader:
    __slots__ = ("type", "offset", "vaddr", "paddr", "filesz", "memsz", "flags", "align")

    def __init__(self, type, offset, vaddr, paddr, filesz, memsz, flags, align):
        self.type, self.offset, self.vaddr, self.paddr = type, offset, vaddr, paddr
        self.filesz, self.memsz, self.flags, self.align = filesz, memsz, flags, align


class ElfImage:
    """An ELF file's header fields and program headers (``data`` is the whole file)."""

    def __init__(self, data: bytes):
        self.data = data
        if len(data) < 4 or data[:4] != ELF_MAGIC:
            raise ElfFormatError("not an ELF file")
        if len(data) < 16:
            raise ElfFormatError("malformed ELF: truncated header")
        cls, order = data[4], data[5]
        if order != ELFDATA2LSB:
            raise ElfFormatError("malformed ELF: not little-endian")
        if cls == ELFCLASS64:
            ehdr, phdr = _EHDR64, _PHDR64
        elif cls == ELFCLASS32:
            ehdr, phdr = _EHDR32, _PHDR32
        else:
            raise ElfFormatError(f"malformed ELF: class {cls}")
        if len(data) < ehdr.size:
            raise ElfFormatError("malformed ELF: truncated header")
        (_, _, self.machine, _, self.entry, phoff, _, _, _, phentsize, phnum, _, _,
         _) = ehdr.unpack_from(data)
        self.elfclass = 64 if cls == ELFCLASS64 else 32
        if phnum > MAX_PHNUM:
            raise ElfFormatError(f"malformed ELF: {phnum} program headers")
        if phnum and phentsize < phdr.size:
            raise ElfFormatError(f"malformed ELF: program header size {phentsize}")
        if phoff + phnum * phentsize > len(data):
            raise ElfFormatError("malformed ELF: program headers extend past the end of the file")
        self.segments: list[ProgramHeader] = []
        for i in range(phnum):
            f = phdr.unpack_from(data, phoff + i * phentsize)
            if cls == ELFCLASS64:
                ptype, flags, offset, vaddr, paddr, filesz, memsz, align = f
            else:
                ptype, offset, vaddr, paddr, filesz, memsz, flags, align = f
            self.segments.append(ProgramHeader(ptype, offset, vaddr, paddr, filesz, memsz, flags,
                                               align))

    def segment_data(self, seg: ProgramHeader) -> bytes:
        if seg.offset + seg.filesz > len(self.data):
            raise ElfFormatError(f"segment at {seg.paddr:#x} extends past the end of the file")
        return self.data[seg.offset:seg.offset + seg.filesz]

    def notes(self):
        """Yield (name, type, desc) for every note in every PT_NOTE segment."""
        for seg in self.segments:
            if seg.type != PT_NOTE:
                continue
            data = self.segment_data(seg)
            off = 0
            while off + 12 <= len(data):
                namesz, descsz, ntype = struct.unpack_from("<III", data, off)
                off += 12
                desc_off = off + ((namesz + 3) & ~3)
                desc_end = desc_off + descsz
                if desc_end > len(data):
                    raise ElfFormatError("malformed ELF: truncated note")
                yield data[off:off + namesz].rstrip(b"\0"), ntype, data[desc_off:desc_end]
                off = desc_off + ((descsz + 3) & ~3)
