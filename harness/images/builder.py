"""Building an image from its recipe and caching it by its inputs."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from harness.errors import ConfigError, ImageBuildError, ProvisionError
from harness.images.cpio import CpioWriter
from harness.images.debs import (
    DEBS_JSON,
    DebSet,
    kernel_package_of,
    kernel_release_of,
    read_debset,
)
from harness.images.kmod import ModuleIndex
from harness.images.recipe import AGENT_DIR, RECIPES_DIR, NestedPayload, Recipe, load_recipe
from harness.images.tools import (
    BOOT_FILES,
    align,
    elf_needed,
    install_file,
    ldd_libraries,
    make_esp,
    mem_region_checksum,
    pe_image_end,
    run_tool,
    write_plain_key,
    write_secret,
)
from harness.inventory.catalog import PackageRef
from harness.inventory.provision import (
    AptArchive,
    NotProvisioned,
    deb_field,
    provisioning_allowed,
    staging,
    unpack,
    verify_prefix,
    write_manifest,
)
from harness.paths import cache_root, ensure_dir, file_sha256

log = logging.getLogger(__name__)

LOCK_TIMEOUT = 1800.0

AGENT_PROTOCOL = 2

IMAGE_JSON = "image.json"

# Output files inside an image directory.
ESP_IMG = "esp.img"
UKI = "uki.efi"
KERNEL = "vmlinuz"
INITRD = "initrd.img"
DATA_IMG = "data.img"
HOST_KEY_PUB = "host_key.pub"
HOST_KEY_DROPBEAR = "dropbear_host_key"
CLIENT_KEY = "client_key"
CLIENT_KEY_PUB = "client_key.pub"



# --- the image -------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    """A built guest image: the files a VM spec points at, and how to reach the guest."""

    name: str
    arch: str
    root: Path
    esp: Path  # raw ESP disk image (FAT, \\EFI\\BOOT\\BOOTX64.EFI = the UKI)
    uki: Path
    kernel: Path
    initrd: Path
    cmdline: str  # base kernel command line, also embedded in the UKI
    data_disk: Path | None  # second disk (nested-l1: QEMU + L2 payload), or None
    host_key: str  # pinned public host key line: "ssh-ed25519 AAAA..."
    client_key: Path  # OpenSSH-format private key for root (paramiko loads it)
    inputs_hash: str
    kernel_version: str = ""
    packages: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-friendly description (``harness images show --json``)."""
        return {
            "name": self.name,
            "arch": self.arch,
            "root": str(self.root),
            "esp": str(self.esp),
            "uki": str(self.uki),
            "kernel": str(self.kernel),
            "initrd": str(self.initrd),
            "cmdline": self.cmdline,
            "data_disk": str(self.data_disk) if self.data_disk else None,
            "host_key": self.host_key,
            "client_key": str(self.client_key),
            "inputs_hash": self.inputs_hash,
            "kernel_version": self.kernel_version,
            "packages": dict(self.packages),
        }


def images_dir() -> Path:
    """Where built images are cached."""
    return cache_root() / "images"


def read_image(root: Path) -> Image:
    """The :class:`Image` stored in a complete image directory."""
    try:
        meta = json.loads((root / IMAGE_JSON).read_text())
    except (OSError, ValueError) as exc:
        raise ImageBuildError(f"{root / IMAGE_JSON} unreadable: {exc}") from exc
    data_disk = root / DATA_IMG if meta.get("data_disk") else None
    return Image(
        name=meta["name"],
        arch=meta["arch"],
        root=root,
        esp=root / ESP_IMG,
        uki=root / UKI,
        kernel=root / KERNEL,
        initrd=root / INITRD,
        cmdline=meta["cmdline"],
        data_disk=data_disk,
        host_key=meta["host_key"],
        client_key=root / CLIENT_KEY,
        inputs_hash=meta["inputs_hash"],
        kernel_version=meta.get("kernel_version", ""),
        packages=meta.get("packages", {}),
    )


def recipe_for(name: str, arch: str | None = None, recipes_dir: Path = RECIPES_DIR) -> Recipe:
    """Recipe ``name`` for ``arch`` (None: whatever arch it is for).

    When ``name`` is for another architecture, its variant ``<name>-<arch>`` (say
    ``minimal-aarch64``) is used if one exists, so specs say ``image="minimal"`` on
    every architecture."""
    recipe = load_recipe(name, recipes_dir)
    if arch is None or recipe.arch == arch:
        return recipe
    variant = f"{name}-{arch}"
    if (recipes_dir / f"{variant}.toml").is_file():
        found = load_recipe(variant, recipes_dir)
        if found.arch == arch:
            return found
        raise ConfigError(f"image recipe {variant!r} is for {found.arch}, not {arch}")
    raise ConfigError(
        f"image recipe {name!r} is for {recipe.arch}, not {arch}, and there is no "
        f"{variant!r} recipe"
    )


def ensure_image(name: str, arch: str | None = None, *, refresh: bool = False) -> Image:
    """The image ``name`` for ``arch``, built (under a file lock) when absent or stale.

    ``arch`` None takes the recipe as it is; another architecture than the recipe's
    takes its ``<name>-<arch>`` variant (:func:`recipe_for`).  Returns at once when a
    complete image with the same inputs is cached.  ``refresh`` re-resolves the recipe's
    packages against Debian's archive first.
    """
    return Builder(recipe_for(name, arch)).ensure(refresh=refresh)




# --- the builder -----------------------------------------------------------------------


#: The memory regions whose MD5 the image carries, so that ``agent mem-fill`` need not hash
#: what it just wrote (0.5 s of each L1 boot under TCG, 3.5-4.5 s of an L2's): the
#: defaults of a VmSpec (guest_mem_mb, seed) and of the L2 the agent's ``l2 start`` runs.
#: Any other size or seed is hashed in the guest as before.
KNOWN_REGIONS = ((16, "harness"), (16, "harness-l2"))
MEM_SUMS = "etc/harness/mem.md5"


def _inside(root: Path, rel: str) -> Path:
    """``root/rel`` resolved with symlinks interpreted inside ``root`` (a chroot view)."""
    path = root
    parts = [p for p in rel.split("/") if p]
    hops = 0
    while parts:
        part = parts.pop(0)
        nxt = path / part
        if nxt.is_symlink():
            hops += 1
            if hops > 40:
                raise ImageBuildError(f"symlink loop under {root} at {rel}")
            target = os.readlink(nxt)
            if target.startswith("/"):
                path = root
            parts = [p for p in target.split("/") if p] + parts
        elif part == "..":
            path = path.parent if path != root else root
        else:
            path = nxt
    return path


def builder_modules() -> list[Path]:
    """The modules of this package: what builds an image, so part of every image's key."""
    return sorted(Path(__file__).parent.glob("*.py"))


@dataclass
class Builder:
    """Builds (or finds cached) one recipe's image."""

    recipe: Recipe

    @property
    def name(self) -> str:
        return self.recipe.name

    def lock(self) -> FileLock:
        ensure_dir(images_dir())
        return FileLock(str(images_dir() / f".{self.name}.lock"), timeout=LOCK_TIMEOUT)

    # inputs ---------------------------------------------------------------------------

    def debset(self, refresh: bool = False) -> DebSet:
        """The recipe's .deb files, downloaded (once) into the image cache."""
        r = self.recipe
        listing = json.dumps([r.suite, r.deb_arch, r.kernel_meta, sorted(r.debs)]).encode()
        # Keyed by the package listing alone: recipes with the same packages share them.
        dest = images_dir() / "debs" / hashlib.sha256(listing).hexdigest()[:16]
        found = None if refresh else read_debset(dest)
        if found is not None:
            return found
        with FileLock(str(dest) + ".lock", timeout=LOCK_TIMEOUT):
            found = None if refresh else read_debset(dest)
            if found is not None:
                return found
            if not provisioning_allowed():
                raise NotProvisioned(
                    f"the packages of image {self.name!r} are not in the cache ({dest}); "
                    f"`harness images build {self.recipe.name}` fetches them"
                )
            return self._download(dest)

    def _download(self, dest: Path) -> DebSet:
        from harness.inventory import catalog
        from harness.inventory.provision import Provisioner

        r = self.recipe
        if r.suite not in catalog.default().suites():
            raise ConfigError(
                f"recipe {r.name}: suite {r.suite!r} is not one the catalogue provisions "
                f"({', '.join(sorted(catalog.default().suites()))})"
            )
        archive = Provisioner(catalog.default()).archive()
        if r.deb_arch != archive.arch:
            archive = self._foreign_archive(archive)
        tmp = dest.with_name(dest.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            meta = archive.download([PackageRef(r.kernel_meta, r.suite)], tmp / "meta")
            kpkg = kernel_package_of(deb_field(meta[0], "Depends"))
            refs = [PackageRef(kpkg, r.suite)] + [PackageRef(n, r.suite) for n in r.debs]
            debs = archive.download(refs, tmp)
        except ProvisionError as exc:
            raise ImageBuildError(f"recipe {r.name}: fetching packages failed: {exc}") from exc
        shutil.rmtree(tmp / "meta", ignore_errors=True)
        record = {
            d.name: {
                "package": deb_field(d, "Package"),
                "version": deb_field(d, "Version"),
                "sha256": file_sha256(d),
                "size": d.stat().st_size,
            }
            for d in debs
        }
        (tmp / DEBS_JSON).write_text(json.dumps({"kernel_package": kpkg, "debs": record}, indent=1))
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        log.info("image %s: resolved %d packages (kernel %s)", r.name, len(record), kpkg)
        return DebSet(dest, kpkg, record)

    def _foreign_archive(self, host: AptArchive) -> AptArchive:
        """The recipe's suite for its (non-host) Debian architecture: own private lists."""
        r = self.recipe
        archive = AptArchive(host.root.with_name(f"{host.root.name}-{r.deb_arch}"), (r.suite,),
                             mirror=host.mirror, arch=r.deb_arch)  # fmt: skip
        try:
            archive.update()
        except ProvisionError as exc:
            raise ImageBuildError(f"recipe {r.name}: apt lists for {r.deb_arch}: {exc}") from exc
        return archive

    def tools(self) -> Path | None:
        """The unpacked cross-build tools of the recipe (provisioned once), or None."""
        tools = self.recipe.tools
        if tools is None:
            return None
        from harness.inventory import catalog
        from harness.inventory.provision import Provisioner

        listing = json.dumps([tools.suite, sorted(tools.debs)]).encode()
        dest = images_dir() / "tools" / hashlib.sha256(listing).hexdigest()[:16]
        if verify_prefix(dest) is None:
            return dest
        with FileLock(str(dest) + ".lock", timeout=LOCK_TIMEOUT):
            if verify_prefix(dest) is None:
                return dest
            archive = Provisioner(catalog.default()).archive()
            work = dest.with_name(dest.name + ".debs")
            shutil.rmtree(work, ignore_errors=True)
            try:
                debs = archive.download([PackageRef(n, tools.suite) for n in tools.debs], work)
            except ProvisionError as exc:
                raise ImageBuildError(f"recipe {self.name}: fetching tools failed: {exc}") from exc
            with staging(dest) as tmp:
                unpack(debs, tmp)
                for rel in (tools.objcopy, tools.objdump, tools.emulator):
                    if not (tmp / rel).is_file():
                        raise ImageBuildError(
                            f"recipe {self.name}: tool {rel} is in none of {', '.join(tools.debs)}"
                        )
                write_manifest(tmp, {"kind": "tools", "packages": {
                    deb_field(d, "Package"): deb_field(d, "Version") for d in debs}})  # fmt: skip
            shutil.rmtree(work, ignore_errors=True)
        return dest

    def agent_files(self) -> list[Path]:
        return sorted(p for p in AGENT_DIR.rglob("*") if p.is_file())

    def inputs_hash(self, debs: DebSet, extra: Sequence[str] = ()) -> str:
        """sha256 over recipe files, agent files, this package's modules, the debs and ``extra``."""
        digest = hashlib.sha256()

        def add(label: str, data: bytes) -> None:
            digest.update(f"{label}\0{len(data)}\0".encode())
            digest.update(data)

        for path in self.recipe.files:
            add(f"recipe:{path.name}", path.read_bytes())
        for path in self.agent_files():
            add(f"agent:{path.relative_to(AGENT_DIR)}", path.read_bytes())
        for module in builder_modules():
            add(f"builder:{module.name}", module.read_bytes())
        add("debs", "\n".join(debs.identity()).encode())
        for item in extra:
            add("extra", item.encode())
        return digest.hexdigest()

    # ensure ---------------------------------------------------------------------------

    def ensure(self, refresh: bool = False) -> Image:
        debs = self.debset(refresh=refresh)
        extra, context = self._nested_inputs()
        tools = self.tools()
        if tools is not None:
            from harness.inventory.provision import read_manifest

            pkgs = (read_manifest(tools) or {}).get("packages")
            extra = [*extra, "tools:" + json.dumps(pkgs, sort_keys=True)]
            context = {**context, "tools": tools}
        digest = self.inputs_hash(debs, extra)
        final = images_dir() / f"{self.name}-{digest[:16]}"
        if verify_prefix(final) is None:
            return read_image(final)
        with self.lock():
            problem = verify_prefix(final)
            if problem is None:
                return read_image(final)
            if not provisioning_allowed():
                raise NotProvisioned(
                    f"image {self.name!r} is not built ({problem}); `harness images build {self.recipe.name}` builds it"
                )
            log.info("building image %s (%s)", self.name, problem)
            started = time.monotonic()
            with staging(final) as tmp:
                self._build(tmp, debs, digest, context)
            log.info("image %s built in %.1f s: %s", self.name, time.monotonic() - started, final)
        return read_image(final)

    def _nested_inputs(self) -> tuple[list[str], dict[str, Any]]:
        nested = self.recipe.nested
        if nested is None:
            return [], {}
        from harness.inventory import catalog
        from harness.inventory.provision import Provisioner, read_manifest

        l2 = ensure_image(nested.l2_image, self.recipe.arch)
        prov = Provisioner(catalog.default())
        try:
            qemu_prefix = prov.ensure_qemu(
                catalog.default().qemu_entry(nested.qemu, self.recipe.arch)
            )
            fw_prefix = prov.ensure_firmware(
                catalog.default().firmware_entry(nested.firmware, self.recipe.arch)
            )
        except ProvisionError as exc:
            raise ImageBuildError(f"recipe {self.name}: provisioning failed: {exc}") from exc
        libs = self._qemu_libraries(qemu_prefix, nested)
        extra = [
            f"l2:{l2.name}:{l2.inputs_hash}:{l2.host_key}",
            "qemu:"
            + json.dumps((read_manifest(qemu_prefix) or {}).get("packages"), sort_keys=True),
            "firmware:"
            + json.dumps((read_manifest(fw_prefix) or {}).get("packages"), sort_keys=True),
            "libs:" + ",".join(f"{k}={v}:{v.stat().st_size}" for k, v in sorted(libs.items())),
        ]
        return extra, {"l2": l2, "qemu_prefix": qemu_prefix, "fw_prefix": fw_prefix, "libs": libs}

    @staticmethod
    def _qemu_libraries(prefix: Path, nested: NestedPayload) -> dict[str, Path]:
        libpath = [prefix / "usr/lib/x86_64-linux-gnu", prefix / "lib/x86_64-linux-gnu"]
        binary = prefix / "usr/bin/qemu-system-x86_64"
        if not binary.is_file():
            raise ImageBuildError(f"{binary} missing: is the QEMU prefix complete?")
        libs = ldd_libraries(binary, libpath)
        for rel in nested.qemu_files:
            if rel.endswith(".so"):
                libs.update(ldd_libraries(prefix / rel, libpath))
        return libs

    # build ----------------------------------------------------------------------------

    def _build(self, out: Path, debs: DebSet, digest: str, context: Mapping[str, Any]) -> None:
        r = self.recipe
        work = out / ".work"
        pkgs = work / "pkgs"
        ensure_dir(pkgs)
        t0 = time.monotonic()
        unpack(debs.paths(), pkgs)
        log.info(
            "image %s: unpacked %d packages in %.1f s",
            r.name,
            len(debs.debs),
            time.monotonic() - t0,
        )
        kver = kernel_release_of(debs.kernel_package)
        vmlinuz = pkgs / "boot" / f"vmlinuz-{kver}"
        if not vmlinuz.is_file():
            raise ImageBuildError(f"{debs.kernel_package} has no boot/vmlinuz-{kver}")

        l2: Image | None = context.get("l2")
        if l2 is not None:
            # L1 and L2 answer with the same keys: the harness pins one host key.
            for name in (HOST_KEY_DROPBEAR, HOST_KEY_PUB, CLIENT_KEY, CLIENT_KEY_PUB):
                shutil.copy2(l2.root / name, out / name)
            host_key = l2.host_key
        else:
            host_key = self._make_keys(out, pkgs, context.get("tools"))

        root = work / "root"
        self._rootfs(root, pkgs, kver, out, context.get("tools"))
        initrd = out / INITRD
        self._initramfs(root, initrd)
        shutil.copy2(self._kernel_image(vmlinuz, pkgs / "boot" / f"config-{kver}", debs), out / KERNEL)
        self._uki(pkgs / r.stub, out / KERNEL, initrd, out / UKI, work, context.get("tools"))
        self._esp(out / UKI, out / ESP_IMG)
        data_disk = False
        if r.nested is not None:
            self._data_disk(out / DATA_IMG, work / "data", context)
            data_disk = True
        shutil.rmtree(work)
        meta = {
            "name": r.name,
            "arch": r.arch,
            "cmdline": r.cmdline,
            "inputs_hash": digest,
            "host_key": host_key,
            "kernel_version": kver,
            "kernel_repack": r.kernel_repack,
            "packages": debs.versions(),
            "data_disk": data_disk,
            "agent": AGENT_PROTOCOL,
            "recipe_files": [str(p) for p in r.files],
        }
        (out / IMAGE_JSON).write_text(json.dumps(meta, indent=1, sort_keys=True))
        write_manifest(out, {"kind": "image", "name": r.name, "inputs_hash": digest})

    def _kernel_image(self, vmlinuz: Path, config: Path, debs: DebSet) -> Path:
        """The package's kernel, or the same kernel repacked as the recipe asks."""
        if self.recipe.kernel_repack is None:
            return vmlinuz
        from harness.images.kernel import ensure_lz4
        from harness.inventory import catalog
        from harness.inventory.provision import Provisioner

        if not config.is_file():
            raise ImageBuildError(f"{debs.kernel_package} has no {config.name}: its config builds the wrapper")
        archive = Provisioner(catalog.default()).archive()
        version = debs.versions()[debs.kernel_package]
        return ensure_lz4(vmlinuz, config, version, self.recipe.suite, archive, images_dir() / "kernels")

    def _tool(self, tools: Path | None, which: str) -> tuple[list[str | Path], dict[str, str] | None]:
        """argv prefix and environment of build tool ``which`` (objcopy, objdump, emulator):
        the host's own, or the recipe's cross tool (its private libraries first)."""
        if tools is None or self.recipe.tools is None:
            return ([which] if which != "emulator" else []), None
        rel = getattr(self.recipe.tools, which)
        libs = [tools / "usr/lib/x86_64-linux-gnu", tools / "lib/x86_64-linux-gnu"]
        env = dict(os.environ, LD_LIBRARY_PATH=":".join(str(d) for d in libs if d.is_dir()))
        return [tools / rel], env

    def _lib_dirs(self) -> tuple[str, ...]:
        """Where the target's libraries may be in the unpacked packages."""
        libdir = self.recipe.libdir
        return (libdir, f"usr/{libdir}", "lib64", "lib", "usr/lib")

    def _make_keys(self, out: Path, pkgs: Path, tools: Path | None = None) -> str:
        """Host key (dropbear format, made by the packaged dropbearkey) and client key.

        The client key is RSA: what a guest spends on every SSH login is verifying its
        signature, and dropbear verifies Ed25519 with TweetNaCl's slow field arithmetic
        (two scalar multiplications, 10 ms of a TCG guest's time per connection: a login
        took 39 ms) where an RSA signature (public exponent 65537) is a few multiplications
        (29 ms).  The host key stays Ed25519: signing is one fixed-base scalar
        multiplication, where an RSA host key would cost the guest a private-key operation
        per login."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        write_secret(out / CLIENT_KEY, private)
        (out / CLIENT_KEY_PUB).write_bytes(public + b" harness-client\n")

        loader = _inside(pkgs, self.recipe.loader)
        libpath = ":".join(str(pkgs / d) for d in self._lib_dirs()[:2])
        keygen = pkgs / "usr/bin/dropbearkey"
        hostkey = out / HOST_KEY_DROPBEAR
        emu, env = self._tool(tools, "emulator")  # runs a foreign dropbearkey
        run_tool([*emu, loader, "--library-path", libpath, keygen, "-t", "ed25519", "-f", hostkey],
                 env=env)  # fmt: skip
        os.chmod(hostkey, 0o600)
        text = run_tool([*emu, loader, "--library-path", libpath, keygen, "-y", "-f", hostkey],
                        env=env).decode()  # fmt: skip
        match = re.search(r"^(ssh-ed25519 \S+)", text, re.M)
        if not match:
            raise ImageBuildError(f"dropbearkey -y printed no ssh-ed25519 key: {text!r}")
        (out / HOST_KEY_PUB).write_text(match.group(1) + "\n")
        return match.group(1)

    def _rootfs(self, root: Path, pkgs: Path, kver: str, out: Path,
                tools: Path | None = None) -> None:
        r = self.recipe
        for d in ("bin", "sbin", "usr/bin", "usr/sbin", r.libdir, str(Path(r.loader).parent),
                  "etc/harness/boot.d", "etc/dropbear", "proc", "sys", "dev", "run", "tmp",
                  "root", "var/log", "usr/lib/harness", "data", "mnt"):  # fmt: skip
            ensure_dir(root / d)
        os.chmod(root / "root", 0o700)
        os.chmod(root / "tmp", 0o1777)

        busybox = root / "bin/busybox"
        shutil.copy2(_inside(pkgs, r.busybox), busybox)
        for rel in r.binaries:
            self._install_binary(root, pkgs, rel)
        emu, env = self._tool(tools, "emulator")  # runs a foreign busybox
        applets = run_tool([*emu, busybox, "--list-full"], env=env).decode().split()
        for applet in applets:
            link = root / applet
            if link.exists() or link.is_symlink() or applet in ("linuxrc",):
                continue
            ensure_dir(link.parent)
            link.symlink_to("/bin/busybox")

        moddir = pkgs / "lib/modules" / kver
        index = ModuleIndex.scan(moddir)
        boot, boot_deps = index.closure(r.boot_modules)
        extra, extra_deps = index.closure(r.extra_modules)
        deps = {**boot_deps, **extra_deps}
        target = ensure_dir(root / "lib/modules" / kver)
        for name in deps:
            (target / f"{name}.ko").write_bytes(index.read(name))
        (target / "deps").write_text(
            "".join(f"{n}: {' '.join(d)}\n" for n, d in sorted(deps.items()))
        )
        (root / "etc/harness/modules.boot").write_text("".join(f"{n}\n" for n in boot))
        (root / "etc/harness/kver").write_text(kver + "\n")
        (root / MEM_SUMS).write_text("".join(f"{size} {seed} {mem_region_checksum(size, seed)}\n"
                                             for size, seed in KNOWN_REGIONS))  # fmt: skip
        (root / "etc/harness/image").write_text(r.name + "\n")
        if r.nested is not None:
            (root / "etc/harness/data_label").write_text(r.nested.data_label + "\n")

        install_file(AGENT_DIR / "init", root / "init", 0o755)
        install_file(AGENT_DIR / "agent", root / "usr/bin/agent", 0o755)
        install_file(AGENT_DIR / "lib.sh", root / "usr/lib/harness/lib.sh", 0o644)
        for hook in r.hooks:
            src = AGENT_DIR / "boot.d" / hook
            if not src.is_file():
                raise ImageBuildError(f"recipe {r.name}: agent hook {src} missing")
            install_file(src, root / "etc/harness/boot.d" / hook, 0o644)

        (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (root / "etc/group").write_text("root:x:0:\ntty:x:5:\n")
        write_secret(root / "etc/shadow", b"root:*:19000:0:99999:7:::\n")
        (root / "etc/shells").write_text("/bin/sh\n")
        (root / "etc/hosts").write_text(f"127.0.0.1 localhost {r.name}\n")
        (root / "etc/os-release").write_text(self._os_release())
        (root / "var/log/lastlog").write_bytes(b"")
        ensure_dir(root / "root/.ssh", 0o700)
        os.chmod(root / "root/.ssh", 0o700)
        write_secret(root / "root/.ssh/authorized_keys", (out / CLIENT_KEY_PUB).read_bytes())
        write_secret(
            root / "etc/dropbear/dropbear_ed25519_host_key", (out / HOST_KEY_DROPBEAR).read_bytes()
        )

    def _install_binary(self, root: Path, pkgs: Path, rel: str) -> None:
        """Copy ``rel`` from the packages and every library it needs (recursively)."""
        src = _inside(pkgs, rel)
        if not src.is_file():
            raise ImageBuildError(f"recipe {self.name}: {rel} is in none of its packages")
        install_file(src, root / rel, 0o755)
        pending = [src]
        seen: set[str] = set()
        while pending:
            for soname in elf_needed(pending.pop()):
                if soname in seen:
                    continue
                seen.add(soname)
                lib = self._find_lib(pkgs, soname, rel)
                install_file(lib, root / self.recipe.libdir / soname, 0o755)
                pending.append(lib)
        rloader, libdir = self.recipe.loader, self.recipe.libdir
        loader = _inside(pkgs, rloader)
        if not loader.is_file():
            raise ImageBuildError(f"recipe {self.name}: no {rloader} (add libc6)")
        name = Path(rloader).name
        if not (root / rloader).exists() and not (root / rloader).is_symlink():
            install_file(loader, root / libdir / name, 0o755)
            (root / rloader).symlink_to(f"/{libdir}/{name}")

    def _find_lib(self, pkgs: Path, soname: str, needed_by: str) -> Path:
        for d in self._lib_dirs():
            path = _inside(pkgs, f"{d}/{soname}")
            if path.is_file():
                return path
        raise ImageBuildError(
            f"recipe {self.name}: {needed_by} needs {soname}, which none of its packages "
            f"ship; add the package to [packages] debs in {self.recipe.files[-1]}"
        )

    def _os_release(self) -> str:
        return (
            f'ID=harness\nNAME="harness {self.recipe.name}"\n'
            f'PRETTY_NAME="harness guest {self.recipe.name}"\nVERSION_ID="{AGENT_PROTOCOL}"\n'
        )

    def _initramfs(self, root: Path, dest: Path) -> None:
        raw = dest.with_suffix(".cpio")
        with raw.open("wb") as fh:
            writer = CpioWriter(fh)
            writer.add_tree(root)
            writer.add_chardev("dev/console", 5, 1)
            writer.add_chardev("dev/null", 1, 3, 0o666)
            writer.finish()
        # zstd: under TCG the kernel unpacks it in 0.6-0.7 s, about 0.3 s more than a plain
        # cpio, but the larger UKI costs OVMF and the stubs that much again in reading and
        # copying; lz4 (3.6 MB against 2.7) was no faster either (six interleaved boots).
        run_tool(["zstd", "-q", "-f", "-12", "-T0", "--no-check", raw, "-o", dest])
        raw.unlink()

    def _uki(self, stub: Path, kernel: Path, initrd: Path, dest: Path, work: Path,
             tools: Path | None = None) -> None:
        """The stub plus .osrel/.cmdline/.initrd/.linux sections, each placed after the
        stub's image on a page boundary (the stub finds them by name in memory)."""
        if not stub.is_file():
            raise ImageBuildError(f"recipe {self.name}: EFI stub {stub} missing")
        osrel = work / "osrel"
        osrel.write_text(self._os_release())
        cmdline = work / "cmdline"
        cmdline.write_bytes(self.recipe.cmdline.encode() + b"\0")
        objdump, env = self._tool(tools, "objdump")
        headers = run_tool([*objdump, "-p", "-h", stub], env=env).decode()
        end = pe_image_end(headers)
        objcopy, env = self._tool(tools, "objcopy")
        args: list[str | Path] = [*objcopy]
        vma = align(end, 0x1000)
        for section, path in (
            (".osrel", osrel),
            (".cmdline", cmdline),
            (".initrd", initrd),
            (".linux", kernel),
        ):
            args += [
                "--add-section",
                f"{section}={path}",
                "--change-section-vma",
                f"{section}={vma:#x}",
            ]
            vma = align(vma + path.stat().st_size, 0x1000)
        run_tool([*args, stub, dest], env=env)

    def _esp(self, uki: Path, dest: Path) -> None:
        size_mb = self.recipe.esp_size_mb or (uki.stat().st_size >> 20) + 8
        if (size_mb << 20) < uki.stat().st_size + (1 << 20):
            raise ImageBuildError(f"recipe {self.name}: esp.size_mb={size_mb} cannot hold the UKI")
        make_esp(uki, dest, self.recipe.boot_file, size_mb)

    def _data_disk(self, dest: Path, data: Path, context: Mapping[str, Any]) -> None:
        """QEMU (binary, libraries, blobs), OVMF and the L2 image on an ext2 disk."""
        nested = self.recipe.nested
        assert nested is not None
        qemu: Path = context["qemu_prefix"]
        fw: Path = context["fw_prefix"]
        l2: Image = context["l2"]
        libs: Mapping[str, Path] = context["libs"]
        install_file(qemu / "usr/bin/qemu-system-x86_64", data / "qemu/bin/qemu-system-x86_64", 0o755)
        for soname, path in libs.items():
            install_file(path.resolve(), data / "qemu/lib" / soname, 0o755)
        for rel in nested.qemu_files:
            src = (qemu / rel).resolve()
            if not src.is_file():
                raise ImageBuildError(f"recipe {self.name}: {rel} not in QEMU {nested.qemu}")
            sub = "qemu/lib/qemu" if rel.endswith(".so") else "qemu/share"
            install_file(src, data / sub / Path(rel).name, 0o644)
        code, vars_ = nested.firmware_files
        for rel, name in ((code, "OVMF_CODE_4M.fd"), (vars_, "OVMF_VARS_4M.fd")):
            src = fw / rel
            if not src.is_file():
                raise ImageBuildError(f"recipe {self.name}: {rel} not in OVMF {nested.firmware}")
            install_file(src, data / "ovmf" / name, 0o644)
        for src, name in ((l2.kernel, "vmlinuz"), (l2.initrd, "initrd.img"), (l2.esp, "esp.img")):
            install_file(src, data / "l2" / name, 0o644)
        (data / "l2/cmdline").write_text(l2.cmdline + "\n")
        (data / "l2/image").write_text(f"{l2.name} {l2.inputs_hash}\n")
        used = sum(p.stat().st_size for p in data.rglob("*") if p.is_file())
        size_kb = (used * 11 // 10 >> 10) + 16384
        run_tool(["mke2fs", "-q", "-F", "-t", "ext2", "-L", nested.data_label, "-d", data,
                  dest, f"{size_kb}k"])  # fmt: skip


def signed_esp(image: Image, key: Path, cert: Path, passphrase: bytes | None = None) -> Path:
    """``image``'s ESP with its UKI signed (sbsign) by ``key``/``cert``, for a Secure Boot
    varstore that enrolls that certificate; built once per image and certificate.  An
    encrypted key is decrypted with ``passphrase`` into the private work directory."""
    fp = hashlib.sha256(cert.read_bytes()).hexdigest()[:12]
    out = image.root / f"signed-{fp}"
    esp = out / ESP_IMG
    if esp.is_file():
        return esp
    with FileLock(str(out) + ".lock", timeout=LOCK_TIMEOUT):
        if esp.is_file():
            return esp
        work = Path(tempfile.mkdtemp(prefix=".signed-", dir=image.root))
        try:
            uki = work / UKI
            plain = work / "signing.key"
            write_plain_key(key, plain, passphrase)
            run_tool(["sbsign", "--key", plain, "--cert", cert, "--output", uki, image.uki])
            plain.unlink()
            size_mb = (image.esp.stat().st_size + (1 << 20) - 1) >> 20
            make_esp(uki, work / ESP_IMG, BOOT_FILES.get(image.arch, "BOOTX64.EFI"), size_mb)
            (work / "cert.pem").write_bytes(cert.read_bytes())
            shutil.rmtree(out, ignore_errors=True)  # a half-made one from a killed run
            os.replace(work, out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return esp
