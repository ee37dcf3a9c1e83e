"""The libvirt/KVM driver."""

from .config import DriverConfig
from .driver import LibvirtDriver

__all__ = ["DriverConfig", "LibvirtDriver"]
