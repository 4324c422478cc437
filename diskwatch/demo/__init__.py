"""The demo guest: a tiny bootable Linux disk image whose disk activity is worth watching."""

from diskwatch.demo.guest import (
    GuestImage,
    MissingToolError,
    build_guest_image,
    find_kernel,
    probe_kvm,
)

__all__ = ["GuestImage", "MissingToolError", "build_guest_image", "find_kernel", "probe_kvm"]
