/*
 * hived._sys: the few Linux syscalls and ioctls Python 3.11 lacks, for the
 * box's per-cell network namespaces (hived/box/network.py).
 *
 *   setns(fd, nstype), unshare(flags), mount(...), umount2(...)
 *       libc's own functions, declared in _native/sys_build.py's cdef; callers
 *       read errno through ffi.errno (cffi saves it right after the call).
 *   hived_tap_open(name, create, persist)
 *       opens /dev/net/tun (O_CLOEXEC) in the calling thread's network
 *       namespace and attaches it to the tap `name` with
 *       IFF_TAP | IFF_NO_PI | IFF_VNET_HDR (creating the tap if `create`;
 *       making it persistent if `persist`); returns the fd or -errno.
 *   hived_tap_set_offload(fd, flags)
 *       TUNSETOFFLOAD: which offloads the fd's reader handles (TUN_F_*).
 *
 * Every constant comes from the system headers (<sched.h>, <sys/mount.h>,
 * <linux/if_tun.h>, <net/if.h>); none is copied by hand.
 * Built by _native/sys_build.py (cffi API mode) into hived._sys.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* setns, unshare, CLONE_*; Python.h already defines it */
#endif
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <unistd.h>

#include <net/if.h>
#include <linux/if_tun.h>

#define HIVED_TUN_PATH "/dev/net/tun"
/* Flags every hived tap is opened with: a tap (Ethernet frames), no packet
 * information header, a virtio-net header in front of each frame (QEMU's
 * virtio-net passes it through, so GSO/checksum offloads cross the tap). */
#define HIVED_TAP_FLAGS (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)

static int hived_tap_open(const char *name, int create, int persist)
{
    struct ifreq ifr;
    size_t len;
    int fd, err;

    if (name == NULL)
        return -EINVAL;
    len = strlen(name);
    /* Safe: the length is checked against IFNAMSIZ - 1 before the copy below,
     * so ifr_name (IFNAMSIZ bytes, zeroed) always ends with a NUL. */
    if (len == 0 || len >= IFNAMSIZ)
        return -EINVAL;
    memset(&ifr, 0, sizeof(ifr));
    memcpy(ifr.ifr_name, name, len);
    ifr.ifr_flags = HIVED_TAP_FLAGS;
    /* Without IFF_TUN_EXCL an existing tap of that name is attached to (and
     * creation is only a side effect when none exists), so refuse to create
     * by accident: with create == 0, an absent tap is ENODEV, not a new one. */
    if (!create) {
        if (if_nametoindex(name) == 0)
            return -ENODEV;
    } else {
        ifr.ifr_flags |= IFF_TUN_EXCL;
    }
    fd = open(HIVED_TUN_PATH, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    /* Safe: ifr is a fully initialised struct ifreq, the argument type
     * TUNSETIFF expects; the kernel copies it in and back out. */
    if (ioctl(fd, TUNSETIFF, &ifr) < 0)
        goto fail;
    /* Safe: TUNSETPERSIST takes its argument by value (an integer flag). */
    if (persist && ioctl(fd, TUNSETPERSIST, 1UL) < 0)
        goto fail;
    return fd;
fail:
    err = errno;
    close(fd);
    return -err;
}

static int hived_tap_set_offload(int fd, unsigned int flags)
{
    /* Safe: TUNSETOFFLOAD takes its argument by value (TUN_F_* bits). */
    if (ioctl(fd, TUNSETOFFLOAD, (unsigned long)flags) < 0)
        return -errno;
    return 0;
}
