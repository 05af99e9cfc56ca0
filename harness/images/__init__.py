"""Guest images: building them from Debian packages and caching them by their inputs.

A recipe (``guests/recipes/<name>.toml``, data) names a Debian suite, the packages to
take files from, the kernel modules to ship and what else goes in; the agent
(``guests/agent/``) is the image's ``/init`` and ``agent`` command.  Building needs no
root and no mounts: the initramfs is a newc cpio written here, the UKI is the
systemd-boot stub with sections added by ``objcopy``, the ESP is made with
``mkfs.vfat -C`` + ``mtools`` and a payload disk with ``mke2fs -d``.

An image lives in ``<cache>/images/<name>-<inputs hash>/``; the hash covers the recipe
files, the agent files, the modules of this package, and the exact ``.deb`` files (and, for nested
images, the QEMU/OVMF builds and the L2 image) used.  It is built in a temporary sibling
and renamed into place with a manifest of file sizes (as provisioned prefixes are), so a
partial or corrupt entry is rebuilt instead of used.  A file lock per image serialises
builders (pytest-xdist workers).

The ``.deb`` set of a recipe is resolved once and kept under ``<cache>/images/debs/``;
``ensure_image(..., refresh=True)`` (``harness images build --refresh``) resolves it
again against the archive, and a new package version then changes the hash.

The package, by part: :mod:`~harness.images.recipe` (recipes as data),
:mod:`~harness.images.debs` (the ``.deb`` set), :mod:`~harness.images.kmod` (kernel
modules and their load order), :mod:`~harness.images.cpio` (the initramfs writer),
:mod:`~harness.images.tools` (ESP, keys, ELF/PE inspection) and
:mod:`~harness.images.builder` (the build, the cache, :func:`ensure_image`).
"""

from __future__ import annotations

from harness.images.builder import (
    CLIENT_KEY,
    CLIENT_KEY_PUB,
    DATA_IMG,
    ESP_IMG,
    HOST_KEY_DROPBEAR,
    HOST_KEY_PUB,
    IMAGE_JSON,
    INITRD,
    KERNEL,
    UKI,
    Builder,
    Image,
    ensure_image,
    images_dir,
    read_image,
    recipe_for,
    signed_esp,
)
from harness.images.cpio import CpioWriter
from harness.images.debs import DEBS_JSON, DebSet, kernel_package_of, kernel_release_of, read_debset
from harness.images.kmod import (
    ModuleIndex,
    load_order,
    modinfo_fields,
    module_depends,
    normalize_module,
)
from harness.images.recipe import (
    AGENT_DIR,
    RECIPES_DIR,
    CrossTools,
    NestedPayload,
    Recipe,
    list_images,
    load_recipe,
)
from harness.images.tools import mem_region_checksum, pe_image_end, run_tool, write_plain_key

__all__ = [
    "AGENT_DIR", "CLIENT_KEY", "CLIENT_KEY_PUB", "DATA_IMG", "DEBS_JSON", "ESP_IMG", "HOST_KEY_DROPBEAR",
    "HOST_KEY_PUB", "IMAGE_JSON", "INITRD", "KERNEL", "RECIPES_DIR", "UKI", "Builder", "CpioWriter",
    "CrossTools", "DebSet", "Image", "ModuleIndex", "NestedPayload", "Recipe", "ensure_image",
    "images_dir", "kernel_package_of", "kernel_release_of", "list_images", "load_order", "load_recipe",
    "mem_region_checksum", "modinfo_fields", "module_depends", "normalize_module", "pe_image_end",
    "read_debset", "read_image", "recipe_for", "run_tool", "signed_esp", "write_plain_key",
]
