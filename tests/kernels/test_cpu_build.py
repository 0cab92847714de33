"""Building the C++ kernels: a lock left by a killed build must not hang later processes."""

import os
import time

from peregrine.kernels.cpu import _clear_stale_lock


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    _clear_stale_lock(str(tmp_path))
    assert lock.exists()  # a build may be running right now
    old = time.time() - 3600
    os.utime(lock, (old, old))
    _clear_stale_lock(str(tmp_path))
    assert not lock.exists()
    _clear_stale_lock(str(tmp_path))  # no lock at all: nothing to do


def test_build_directory_follows_the_source_not_the_checkout(tmp_path):
    """Two checkouts with the same source share one build; a changed source gets its own
    (so processes from different checkouts never rebuild each other's)."""
    from peregrine.kernels.cpu import build_dir
    a, b = tmp_path / "a.cpp", tmp_path / "b.cpp"
    a.write_text("int f() { return 1; }")
    b.write_text("int f() { return 1; }")
    assert build_dir("ext", str(a)) == build_dir("ext", str(b))
    b.write_text("int f() { return 2; }")
    assert build_dir("ext", str(a)) != build_dir("ext", str(b))


def test_the_compiled_source_is_a_copy_in_the_build_directory(tmp_path):
    from peregrine.kernels.cpu import _stable_copy
    src = tmp_path / "k.cpp"
    src.write_text("int f();")
    build = tmp_path / "build"
    copy = _stable_copy(str(src), str(build))
    assert copy.startswith(str(build)) and open(copy).read() == "int f();"
    assert _stable_copy(str(src), str(build)) == copy  # the same path from any checkout
