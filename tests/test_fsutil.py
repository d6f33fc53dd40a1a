"""hived/fsutil.py: copy_sparse, the copy each clone's scratch disk starts from."""

import os

import pytest

from hived import fsutil


def _memfd_with(regions: dict[int, bytes], size: int) -> int:
    fd = os.memfd_create("hived-test-sparse", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    for offset, data in regions.items():
        os.pwrite(fd, data, offset)
    return fd


@pytest.mark.parametrize("to_disk", [False, True])
def test_copy_sparse_copies_the_data_and_keeps_the_holes(tmp_path, to_disk):
    size = 64 << 20
    regions = {0: b"superblock" * 100, 8 << 20: os.urandom(3 << 20), size - 4096: b"\xff" * 4096}
    src = _memfd_with(regions, size)
    dst_path = tmp_path / "copy.img"
    dst = os.open(dst_path, os.O_RDWR | os.O_CREAT) if to_disk else os.memfd_create("dst", os.MFD_CLOEXEC)
    try:
        os.pwrite(dst, b"old contents" * 1000, 30 << 20)  # whatever was there before goes
        written = fsutil.copy_sparse(src, dst, size)
        assert os.fstat(dst).st_size == size
        data = sum(len(d) for d in regions.values())
        assert data <= written <= data + 4096 * len(regions)  # SEEK_DATA finds whole pages
        assert os.pread(dst, size, 0) == os.pread(src, size, 0)
        # Holes stay holes: about the data's worth of blocks is allocated, not 64 MiB.
        assert os.fstat(dst).st_blocks * 512 < 6 << 20
    finally:
        os.close(src)
        os.close(dst)


def test_copy_sparse_of_an_empty_file_makes_a_hole_of_the_size():
    src = _memfd_with({}, 1 << 20)
    dst = os.memfd_create("dst", os.MFD_CLOEXEC)
    try:
        assert fsutil.copy_sparse(src, dst, 1 << 20) == 0
        assert os.fstat(dst).st_size == 1 << 20 and os.pread(dst, 16, 4096) == b"\0" * 16
    finally:
        os.close(src)
        os.close(dst)
