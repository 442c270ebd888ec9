import pytest


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread: on a shared 2-core machine it is several times faster than two."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_world(tmp_path):
    """A run with the inputs of every later stage: features of 32 tones of 4 pitches, plays that
    follow the pitch (each user likes one), and a config small enough to train in seconds."""
    import numpy as np
    import pandas as pd
    import soundfile

    from sonicrec.catalog import Catalog, Track
    from sonicrec.config import AudioConfig, CFConfig, Config, ModelConfig, TrainConfig
    from sonicrec.features import ingest_run
    from sonicrec.rundir import RunDir

    run = RunDir.prepare(tmp_path / "world")
    audio = AudioConfig(excerpt_seconds=6.0, n_frames=120)
    rng = np.random.default_rng(0)
    t = np.arange(int(6.5 * 22050)) / 22050
    tracks = []
    for i in range(32):
        path = run.audio / f"song{i:02d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        y = 0.3 * np.sin(2 * np.pi * 110 * 2 ** (i % 4) * t) + 0.02 * rng.standard_normal(t.size)
        soundfile.write(path, y.astype(np.float32), 22050)
        tracks.append(Track(f"song{i:02d}", path=str(path)))
    with Catalog(run.catalog) as catalog:
        catalog.upsert(tracks)
    ingest_run(run, audio, workers=1, show_progress=False)
    plays = [(f"user{u}", f"song{i:02d}", int(rng.integers(1, 6)))
             for u in range(40) for i in range(32) if i % 4 == u % 4 or rng.random() < 0.15]
    pd.DataFrame(plays, columns=["user_id", "track_id", "count"]).to_parquet(run.plays)
    Config(
        audio=audio,
        cf=CFConfig(factors=4, iterations=5, valid_fraction=0.25, test_fraction=0.25, seed=3),
        model=ModelConfig.small(conv_channels=(8, 8, 8, 8), dense_units=(16,)),
        train=TrainConfig(optimizer="adam", learning_rate=0.003, batch_size=4, epochs=2, patience=5,
                          crop_frames=110, num_workers=0, seed=3),
    ).save(run.config)
    return run


@pytest.fixture
def deadline():
    """``with deadline(s):`` fails the test with ``Hang`` if its block runs longer than ``s``
    seconds (SIGALRM: it interrupts blocking system calls such as opening a FIFO)."""
    import contextlib
    import signal

    class Hang(Exception):  # not a TimeoutError: code under test may catch OSError and its kin
        pass

    def expire(signum, frame):
        raise Hang("the block ran past its deadline: it hangs")

    @contextlib.contextmanager
    def within(seconds: float):
        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    return within
