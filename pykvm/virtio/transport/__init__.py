"""virtio transports: register maps over a VirtioCore (MMIO, PCI), and the
vhost-user export."""
