"""stages.loop.writer.RoundWriter: the background checkpoint + manifest write of a round (train.async_checkpoint)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from stages.loop.writer import RoundWriter


def test_background_write_overlaps_and_wait_blocks_until_done():
    w = RoundWriter(enabled=True)
    done, threads = [], []

    def write(i):
        def fn():
            time.sleep(0.3)
            threads.append(threading.current_thread().name)
            done.append(i)
        return fn

    t0 = time.perf_counter()
    w.submit(write(0))
    assert time.perf_counter() - t0 < 0.2 and done == []  # the caller goes on while round 0 is written
    w.submit(write(1))  # waits for round 0 first: writes stay in round order
    assert done == [0]
    assert w.wait() > 0.1 and done == [0, 1]
    assert w.wait() < 0.05  # nothing pending
    assert threads and all(n.startswith("round-writer") for n in threads)
    w.close()


def test_failed_write_is_raised_by_the_next_wait_and_by_close():
    w = RoundWriter(enabled=True)

    def boom():
        raise OSError("No space left on device")

    w.submit(boom)
    with pytest.raises(OSError, match="No space left"):
        w.wait()
    w.submit(boom)
    with pytest.raises(OSError, match="No space left"):
        w.close()


def test_disabled_writes_in_line():
    w = RoundWriter(enabled=False)
    done = []
    w.submit(lambda: done.append(threading.current_thread().name))
    assert done == [threading.current_thread().name]
    w.close()


@pytest.mark.parametrize("enabled", [True, False])
def test_close_gives_the_wait_for_the_last_write(enabled):
    """What metrics/train.json reports as `last_write_wait_s`: in the background, the caller's wait for the last
    write; in line, that write's own time (the caller made it)."""
    w = RoundWriter(enabled=enabled)
    w.submit(lambda: time.sleep(0.05))
    w.submit(lambda: time.sleep(0.4))
    waited = w.close()
    assert waited > 0.3  # the last write (0.4 s), not the first (0.05 s), nor none


def test_round_write_puts_the_checkpoint_before_the_manifest(tmp_path, monkeypatch):
    """A round's manifest is written after its checkpoint: a process killed while the checkpoint is written leaves
    no manifest saying `checkpoint: true` (which would stop the next start instead of a replay)."""
    from stages import checkpoint
    from stages.loop import writer

    def killed(*a, **k):
        raise KeyboardInterrupt  # the process dies while the checkpoint is written

    monkeypatch.setattr(checkpoint, "save", killed)
    trainer = SimpleNamespace(rng_state=lambda: {})
    params = SimpleNamespace(train=SimpleNamespace(checkpoint_dir=tmp_path / "p", state_dir=tmp_path / "s"))
    mf = tmp_path / "manifest.json"
    fn = writer.round_write(trainer, params, {"identity": "x", "round": 0}, mf, save=True)
    with pytest.raises(KeyboardInterrupt):
        fn()
    assert not mf.exists()  # a manifest saying checkpoint: true without its checkpoint stops the next start
