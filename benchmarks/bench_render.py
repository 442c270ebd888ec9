"""Speed of the demo world's audio rendering (sonicrec.demo.render), cold and cached, and what it holds.

    python benchmarks/bench_render.py --tracks 150 --workers 2

Renders into a fresh temporary cache (cold), then again from that cache into a second folder
(cached), and prints tracks/s of both, CPU seconds per track (this process and its workers, so
the figure does not depend on other load on the machine), disk size per track and the style,
instrument family and collection counts of the world.
"""

from __future__ import annotations

import argparse
import collections
import resource
import tempfile
import time
from pathlib import Path

from sonicrec.demo.render import render_world


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _timed(root: Path, name: str, args: argparse.Namespace) -> tuple[list, float, float]:
    wall, cpu = time.perf_counter(), _cpu_seconds()
    tracks = render_world(
        root / name, n_tracks=args.tracks, seed=args.seed, cache_dir=root / "cache",
        workers=args.workers, show_progress=False,
    )
    return tracks, time.perf_counter() - wall, _cpu_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracks", type=int, default=150)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tracks, wall, cpu = _timed(root, "cold", args)
        _, cached_wall, _ = _timed(root, "cached", args)
        size = sum(Path(t.path).stat().st_size for t in tracks) / len(tracks)
    n = len(tracks)
    print(f"cold:   {n} tracks in {wall:.1f} s = {n / wall:.2f} tracks/s "
          f"({cpu / n:.3f} CPU s per track, {args.workers} workers)")
    print(f"cached: {n} tracks in {cached_wall:.2f} s = {n / cached_wall:.0f} tracks/s")
    print(f"disk:   {size / 1e3:.0f} kB per track, {size * n / 1e6:.0f} MB in all")
    for key in ("style", "instrument_family", "collection", "mode"):
        counts = collections.Counter(t.meta[key] for t in tracks).most_common()
        print(f"{key}: " + ", ".join(f"{k} {v}" for k, v in counts))


if __name__ == "__main__":
    main()
