"""Several threads restoring from one Checkpoint, and from separate ones, at the same time."""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest
from bundle_builder import make_bundle

import gpuckpt
from gpuckpt.device import HostDevice


@pytest.fixture
def prefix(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {f"t{i}": rng.standard_normal(int(rng.integers(1, 50_000))).astype(np.float32) for i in range(30)}
    return make_bundle(tensors, num_shards=3).write(str(tmp_path / "ck"))


def test_eight_threads_share_one_checkpoint_and_use_their_own(prefix):
    with gpuckpt.open(prefix) as shared:
        expected = shared.restore()

        def work(i):
            if i % 3 == 0:
                return shared.restore(threads=2)
            if i % 3 == 1:
                return shared.restore(device=HostDevice())
            with gpuckpt.open(prefix) as own:
                return own.restore()

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(work, range(8)))
    for result in results:
        assert set(result) == set(expected)
        for name, value in expected.items():
            assert np.asarray(result[name]).tobytes() == value.tobytes()


def test_one_failing_thread_does_not_block_the_others(prefix):
    with gpuckpt.open(prefix) as ckpt:

        def work(i):
            if i == 3:
                return ckpt.restore(["t1", "missing"])
            return ckpt.restore()

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(work, i) for i in range(8)]
            done, not_done = concurrent.futures.wait(futures, timeout=60)
        assert not not_done
        assert sum(isinstance(f.exception(), gpuckpt.TensorNotFoundError) for f in futures) == 1


def test_checkpoint_deleted_while_open_still_restores_the_old_data(prefix, tmp_path):
    """TensorFlow writes the next checkpoint and deletes the old one: open files stay readable."""
    import os

    with gpuckpt.open(prefix) as ckpt:
        expected = {n: v.copy() for n, v in gpuckpt.open(prefix).restore().items()}
        for name in os.listdir(tmp_path):
            os.remove(tmp_path / name)
        got = ckpt.restore(threads=2)
    for name, value in expected.items():
        assert got[name].tobytes() == value.tobytes()


def test_data_overwritten_in_place_is_a_checksum_error(prefix):
    with gpuckpt.open(prefix) as ckpt:
        with open(prefix + ".data-00000-of-00003", "r+b") as f:
            f.write(b"\xde\xad\xbe\xef" * 64)
        with pytest.raises(gpuckpt.ChecksumError):
            ckpt.restore(threads=2)


def test_interrupt_during_a_restore_stops_it_cleanly(prefix):
    import os

    fds = len(os.listdir("/proc/self/fd"))

    def interrupt(done, total):
        raise KeyboardInterrupt

    with gpuckpt.open(prefix) as ckpt:
        for threads in (1, 3):
            with pytest.raises(KeyboardInterrupt):
                ckpt.restore(threads=threads, progress=interrupt)
            with pytest.raises(KeyboardInterrupt):
                ckpt.restore(device=HostDevice(), progress=interrupt)
        assert len(ckpt.restore()) == 30  # still usable
    assert len(os.listdir("/proc/self/fd")) == fds


def test_close_during_a_read_never_closes_a_descriptor_in_use(prefix, monkeypatch):
    """close() from another thread while a read is inside preadv: that read still reads this file
    (its descriptor cannot be closed and its number reused by another file meanwhile); the
    descriptors go when the read is done; anything that needs the files afterwards gets
    ClosedCheckpointError."""
    import os

    before = len(os.listdir("/proc/self/fd"))
    real = os.preadv
    state = {}

    with gpuckpt.open(prefix) as ckpt:
        data_file = ckpt.data_files()[0]

        def preadv_with_close(fd, buffers, offset):
            if "same" in state:
                return real(fd, buffers, offset)
            ckpt.close()  # as another thread would, mid-read
            squatters = [os.open("/dev/zero", os.O_RDONLY) for _ in range(3)]  # take any freed numbers
            try:
                got = real(fd, buffers, offset)
            finally:
                for squatter in squatters:
                    os.close(squatter)
            with open(data_file, "rb") as f:
                f.seek(offset)
                state["same"] = got > 0 and bytes(memoryview(buffers[0])[:got]) == f.read(got)
            return got

        monkeypatch.setattr(os, "preadv", preadv_with_close)
        try:
            ckpt.get_slice("t0")[:]
        except gpuckpt.ClosedCheckpointError:
            pass  # the size check after the read came after close()
        with pytest.raises(gpuckpt.ClosedCheckpointError):
            ckpt.get_slice("t1")[:]
    assert state["same"]
    assert len(os.listdir("/proc/self/fd")) == before
