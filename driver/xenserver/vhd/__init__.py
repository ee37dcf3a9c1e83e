"""Real VHD files (the Microsoft VHD format, as XenServer stores VDIs): dynamic and differencing.

``layout`` holds the on-disk structures, ``image`` one open file, ``chain``
a leaf with its parents: reads that fall through, relinking, validation and
coalescing.
"""

from .chain import (Chain, Info, coalesce, create_differencing, create_dynamic, info, open_chain, parent_path,
                    relink, validate_chain)
from .image import VhdFile
from .layout import DEFAULT_BLOCK_SIZE, DISK_DIFFERENCING, DISK_DYNAMIC, SECTOR

__all__ = ["Chain", "DEFAULT_BLOCK_SIZE", "DISK_DIFFERENCING", "DISK_DYNAMIC", "Info", "SECTOR", "VhdFile",
           "coalesce", "create_differencing", "create_dynamic", "info", "open_chain", "parent_path", "relink",
           "validate_chain"]
