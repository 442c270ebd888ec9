"""CNN training and inference speed on CPU, on SIMULATED features and audio.

Measures, for each model (the blog-size default, ModelConfig.small() and the demo's model):

* training samples/s of the real loop (``sonicrec.train.fit``: memory-mapped feature store,
  DataLoader workers, optimizer, validation excluded), against the same forward+backward+step on
  in-memory tensors in this process (the ratio is the loop's efficiency);
* the fraction of training time spent waiting for data (target < 5 %);
* inference clips/s from the feature store;
* end-to-end ``Predictor.predict_files`` throughput from 30-s wav files (decode + log-mel + network;
  target >= 50 clips/s on 2 cores for the demo model), against decode + log-mel alone.

The features are random log-mel-like arrays and the audio is random tones: SIMULATED data, good for
speed only. Other processes on the machine change the absolute numbers; the ratios are steadier.

    python benchmarks/bench_train.py                # all three models
    python benchmarks/bench_train.py --models small demo --tracks 256 --files 64
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sonicrec.config import AudioConfig, Config, ModelConfig, TrainConfig
from sonicrec.factors import unit_rows
from sonicrec.features import FeatureStore, FeatureStoreWriter
from sonicrec.model import AudioCNN
from sonicrec.predict import Predictor
from sonicrec.train import MSEObjective, fit


def models() -> dict[str, ModelConfig]:
    from sonicrec.demo import DEMO_MODEL

    return {"full": ModelConfig(), "small": ModelConfig.small(), "demo": DEMO_MODEL}


def simulated_store(root: Path, n_tracks: int, audio: AudioConfig, seed: int) -> FeatureStore:
    """SIMULATED log-mel features (dB-like values), written into a real feature store."""
    rng = np.random.default_rng(seed)
    with FeatureStoreWriter(root, audio) as writer:
        for i in range(n_tracks):
            x = rng.normal(-30, 10, (audio.n_mels, audio.n_frames)).astype(np.float16)
            writer.add(f"sim{i:05d}", x)
    return FeatureStore(root)


def simulated_wavs(folder: Path, n_files: int, seconds: float, seed: int) -> list[Path]:
    """SIMULATED audio: random tones plus noise, 44.1 kHz stereo wav (so the front end resamples)."""
    import soundfile

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 44100)) / 44100
    paths = []
    for i in range(n_files):
        y = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t) + 0.02 * rng.standard_normal(t.size)
        path = folder / f"sim{i:04d}.wav"
        soundfile.write(path, np.stack([y, y], axis=1).astype(np.float32), 44100)
        paths.append(path)
    return paths


def in_memory_rate(cfg: Config, batch: int, frames: int, steps: int) -> float:
    """Reference: forward + backward + SGD step on in-memory tensors, samples/s."""
    torch.manual_seed(0)
    model = AudioCNN.for_config(cfg).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x, y = torch.randn(batch, cfg.audio.n_mels, frames), torch.randn(batch, cfg.cf.factors)
    ((model(x) - y) ** 2).mean().backward()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    return batch * steps / (time.perf_counter() - start)


def bench_model(name, model_cfg, store, wavs, args, out: Path) -> dict[str, float]:
    ids = store.track_ids
    train = TrainConfig(epochs=args.epochs, batch_size=32, num_workers=args.workers, seed=0)
    cfg = Config(model=model_cfg, train=train)
    rng = np.random.default_rng(1)
    targets = unit_rows(rng.standard_normal((len(ids), cfg.cf.factors)))
    n_valid = max(8, len(ids) // 8)
    result = fit(
        store, ids[n_valid:], MSEObjective(targets[n_valid:]), ids[:n_valid], MSEObjective(targets[:n_valid]),
        cfg, out / name, show_progress=False,
    )
    reference = in_memory_rate(cfg, 32, store.n_frames, steps=args.ref_steps)
    predictor = Predictor.load(result.checkpoint, device="cpu")
    predictor.predict_store(store, ids[:32])  # warm-up
    start = time.perf_counter()
    predictor.predict_store(store, batch_size=64)
    infer = len(ids) / (time.perf_counter() - start)
    start = time.perf_counter()
    predictor.predict_files(wavs, workers=args.threads)
    end_to_end = len(wavs) / (time.perf_counter() - start)
    return dict(
        train=result.samples_per_s, reference=reference, wait=result.data_wait, infer=infer,
        files=end_to_end, params=sum(p.numel() for p in predictor.model.parameters()),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["full", "small", "demo"])
    parser.add_argument("--tracks", type=int, default=256, help="SIMULATED tracks in the store")
    parser.add_argument("--files", type=int, default=48, help="SIMULATED 30-s wav files")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs (the last is timed)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--threads", type=int, default=2, help="decoding threads of predict_files")
    parser.add_argument("--ref-steps", type=int, default=4, help="in-memory reference steps")
    args = parser.parse_args()

    audio = AudioConfig()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = simulated_store(tmp / "features", args.tracks, audio, seed=0)
        (tmp / "audio").mkdir()
        wavs = simulated_wavs(tmp / "audio", args.files, audio.excerpt_seconds + 2, seed=0)

        from sonicrec.audio import file_to_logmel

        file_to_logmel(wavs[0], audio)  # warm-up: imports, filterbank, page cache
        start = time.perf_counter()
        for path in wavs:
            file_to_logmel(path, audio)
        front_end = len(wavs) / (time.perf_counter() - start)

        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.tracks} SIMULATED "
              f"tracks x {audio.n_mels} x {audio.n_frames}; {args.files} SIMULATED 30-s wav files")
        print(f"front end alone (decode 44.1 kHz stereo wav + resample + log-mel, 1 thread): "
              f"{front_end:.1f} clips/s")
        header = (f"{'model':<6} {'params':>9} {'train/s':>8} {'in-mem/s':>8} {'loop eff':>8} "
                  f"{'data wait':>9} {'infer/s':>8} {'files/s':>8}")
        print(header)
        for name in args.models:
            r = bench_model(name, models()[name], store, wavs, args, tmp / "model")
            print(f"{name:<6} {r['params']:>9,d} {r['train']:>8.1f} {r['reference']:>8.1f} "
                  f"{r['train'] / r['reference']:>8.2f} {100 * r['wait']:>8.1f}% {r['infer']:>8.1f} "
                  f"{r['files']:>8.1f}")


if __name__ == "__main__":
    main()
