/*
 * pci.h - PCI configuration mechanism #1 (ports 0xcf8/0xcfc), bus 0 only,
 * plus BAR sizing/assignment for guests that run without firmware.
 * Everything here is port I/O or memory access that works at CPL 3.
 */
#ifndef PCI_H
#define PCI_H

#include "guest.h"

#define PCI_BDF(bus, dev, fn) (((uint32_t)(bus) << 8) | ((uint32_t)(dev) << 3) | (uint32_t)(fn))

#define PCI_VENDOR_ID     0x00
#define PCI_DEVICE_ID     0x02
#define PCI_COMMAND       0x04
#define PCI_STATUS        0x06
#define PCI_HEADER_TYPE   0x0e
#define PCI_BAR0          0x10
#define PCI_CAP_PTR       0x34

#define PCI_CMD_IO        0x0001
#define PCI_CMD_MEMORY    0x0002
#define PCI_CMD_MASTER    0x0004
#define PCI_CMD_INTX_OFF  0x0400
#define PCI_STATUS_CAPS   0x0010

#define PCI_CAP_MSIX      0x11
#define PCI_CAP_VENDOR    0x09

uint32_t pci_read32(uint32_t bdf, unsigned off);
uint16_t pci_read16(uint32_t bdf, unsigned off);
uint8_t pci_read8(uint32_t bdf, unsigned off);
void pci_write32(uint32_t bdf, unsigned off, uint32_t v);
void pci_write16(uint32_t bdf, unsigned off, uint16_t v);
void pci_write8(uint32_t bdf, unsigned off, uint8_t v);

/* The index-th function on bus 0 (devices 0..31, functions 0..7 when
 * function 0 is multi-function) with this vendor/device; 0 and *bdf set, or
 * -1. */
int pci_find(uint16_t vendor, uint16_t device, int index, uint32_t *bdf);

/* Next capability with this id after config offset `after` (0: from the
 * start of the list); its config offset or 0. */
unsigned pci_find_cap(uint32_t bdf, uint8_t id, unsigned after);

/* Memory BAR `bar`: make sure it is assigned below 4 GiB and return its
 * address.  A BAR that reads 0 (unassigned) or lies above 4 GiB (the guests
 * map only 0..4 GiB) is given an address in the window PCI_WINDOW_BASE..
 * PCI_WINDOW_END: the lowest naturally aligned spot that overlaps no BAR
 * any bus-0 function already has below 4 GiB.
 * Memory decoding and bus mastering are enabled.  *size gets the BAR size.
 * Returns 0 on success, -1 if it is an I/O BAR, unimplemented, or does not
 * fit. *moved is set to 1 when the guest (re)assigned it. */
#define PCI_WINDOW_BASE 0xe0000000ull
#define PCI_WINDOW_END  0xfec00000ull
int pci_bar_map(uint32_t bdf, int bar, uint64_t *addr, uint64_t *size, int *moved);

#endif
