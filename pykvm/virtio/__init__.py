"""virtio: split virtqueues (queue), the device interface, devices and transports."""
