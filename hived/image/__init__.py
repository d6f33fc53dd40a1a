"""The cell image (`hived image build`), built from Debian packages only; a module per job:

    spec.py       the recipe's constants, errors, the hash of the inputs
    tools.py      running tools (one-line failures, a build log)
    kernel.py     the kernel package: apt look-up, download, kconfig, ELF modinfo, extraction
    initramfs.py  the newc cpio: busybox, modules, /init
    rootfs.py     debootstrap, slimming, the build user, hived's guest files, the ext4
    store.py      build into <root>/<hash>, find, prune, manifests
    disks.py      per-cell scratch disks
    bootargs.py   the guest kernel command line

This package's namespace re-exports what the rest of hived uses.


An image is a directory named by a hash of its inputs, holding

    vmlinuz        the kernel of Debian's linux-image-cloud-amd64
    initrd.img     a newc cpio: static busybox, the virtio modules, /init
                   (hived/guest/init.sh)
    root.ext4      debootstrap'ed bookworm (minbase + python3, python3-msgpack),
                   slimmed, with the build user (uid 1000, home /work) and the
                   hived package's pure-Python files byte-compiled in /opt/hived;
                   no journal: it is mounted read-only
    manifest.json  inputs, hashes, sizes, kernel version, build time; written
                   last, so its presence means the image is complete

Layout under the destination root ($HIVED_IMAGE_DIR or /var/lib/hived/images):

    <hash>/                 one complete image per input set (the 3 newest are kept)
    current -> <hash>       the newest build (symlink, replaced atomically)
    cache/debs/             downloaded kernel packages
    cache/debootstrap-*.tar debootstrap results, keyed by suite/variant/include/mirror
    .build-<hash>-<pid>/    a build in progress (renamed to <hash> when done)
    .lock                   serialises builds

The hash covers the kernel package name and version, the module list, init.sh,
the debootstrap suite/variant/include list/mirror, the guest's .py files of the
hived package (GUEST_FILES) and FORMAT_VERSION. A rebuild after a change to the
guest code reuses the kernel package and the debootstrap tarball.

Runs as root on Debian (debootstrap, chroot); needs apt, debootstrap,
e2fsprogs and busybox-static. The initramfs cpio is written here, not by cpio(1).
"""


from hived.image.bootargs import _TSC_RE, guest_kernel_args, host_tsc_khz  # noqa: F401
from hived.image.disks import scratch_disk  # noqa: F401
from hived.image.initramfs import Newc, _elf_is_static, build_initramfs, find_busybox  # noqa: F401
from hived.image.kernel import (  # noqa: F401
    _NO_LISTS,
    KernelParts,
    _apt_update,
    _module_name,
    _read_module,
    extract_kernel,
    fetch_kernel,
    modinfo,
    parse_kconfig,
    resolve_kernel,
)
from hived.image.rootfs import (  # noqa: F401
    _empty_dir,
    _rm,
    add_build_user,
    compile_buildinit,
    debootstrap_tarball,
    finish_rootfs,
    install_hived,
    make_root_ext4,
    slim_rootfs,
    tree_usage,
)
from hived.image.spec import (  # noqa: F401
    _HEX_NAME,
    BUILD_GID,
    BUILD_UID,
    BUILD_USER,
    BUILDINIT_C,
    BUILDINIT_PATH,
    BUSYBOX_APPLETS,
    DEFAULT_DEST,
    FORMAT_VERSION,
    GUEST_FILES,
    IMAGE_FILES,
    INCLUDE,
    INIT_SH,
    INITRD_COMPRESSION,
    KEEP_IMAGES,
    KERNEL_META_PACKAGE,
    MIRROR,
    MODULE_CONFIG,
    MODULES,
    NEEDED_FREE_BYTES,
    NET_MODULES,
    PACKAGE_DIR,
    REQUIRED_BUILTIN,
    ROOT_HEADROOM,
    ROOT_LABEL,
    SUITE,
    TOOLS,
    VARIANT,
    ImageError,
    ImageMissing,
    Kernel,
    _debootstrap_key,
    _sha256_bytes,
    _sha256_file,
    default_dest,
    image_inputs,
    inputs_hash,
    local_inputs,
    local_key,
    python_files,
)
from hived.image.store import (  # noqa: F401
    _build,
    _complete,
    _locked,
    _set_current,
    build_image,
    find_image,
    prune_images,
    read_manifest,
)
from hived.image.tools import _last_error_line, _Log, _require_tools, _run  # noqa: F401
