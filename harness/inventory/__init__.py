"""What exists and where it comes from: the catalogue of QEMU and OVMF builds, Debian
sources, provisioning into the cache, the run registry, host capabilities."""
