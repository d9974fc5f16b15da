"""Boot: put a kernel, its boot information and the firmware tables in guest RAM.

- ``linux.image_kind`` tells the two kinds of kernel apart by content: an ELF
  boots by its PVH note (``pvh.load_pvh`` + ``pvh.write_start_info``), a
  bzImage by the Linux x86 boot protocol (``linux.load_bzimage``: zero page,
  command line, initrd, GDT and identity map for the 64-bit entry).
- ``e820.build_e820``: the memory map both protocols hand over.
- ``acpi.write_acpi``: RSDP, XSDT, FADT, MADT and DSDT in the BIOS area; both
  protocols pass the RSDP's address (zero page / hvm_start_info).

See README.md in this directory for the flow and the guest-physical layout.
"""
