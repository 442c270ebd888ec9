"""The analysis report's web page: ``report.json`` of :func:`sonicrec.analysis.build_report` and the
catalog, poured into the template ``sonicrec/templates/report.html``.

The page is self-contained and works offline: the figures are PNGs beside it, every playlist entry
is an ``<audio>`` player linked (relatively) to the catalog's audio file, starting at the filter's
peak for max-activation playlists, and the t-SNE map is an inline SVG whose points play on click.

>>> page = render_report_page(report, catalog_frame, out=Path("RUN/analysis"))  # doctest: +SKIP
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd

from sonicrec.plotting import label_colours

MAP_WIDTH, MAP_HEIGHT, MAP_PAD = 900, 650, 12  # the SVG map, pixels
_HOW = {"filter-max": "max activation", "filter-mean": "mean activation", "unit": "activation"}
_KIND_NAMES = {"filter-max": "filter {}, max activation", "filter-mean": "filter {}, mean activation",
               "unit": "unit {}", "similar": "songs like {}"}


def render_report_page(report: Mapping[str, Any], tracks: pd.DataFrame, *, out: Path) -> str:
    """The report's ``index.html``.

    Parameters
    ----------
    report : the report as written to ``report.json``
    tracks : the catalog as a frame indexed by track id (``title``, ``artist``, ``path`` and the
        meta fields ``style`` and ``instrument_family`` where present)
    out : the folder the page is written to; audio links are relative to it
    """
    template = Template(resources.files("sonicrec").joinpath("templates", "report.html")
                        .read_text(encoding="utf-8"))
    simulated = (
        " The play counts the factors come from are <b>SIMULATED</b> (demo world); the music is real."
        if report["simulated_plays"] else ""
    )
    map_html, map_tracks = _map_html(report["map"]["points"], tracks, out)
    sections = {kind: _playlist_section(report, kind, tracks, out) for kind in report["playlists"]}
    return template.substitute(
        model=html.escape(report["model"]), run=html.escape(report["run"]), n_tracks=report["n_tracks"],
        tracks=report["tracks"], n_map_tracks=report["n_map_tracks"], simulated=simulated,
        total_seconds=f"{report['seconds']['total']:.0f}", kernel_frames=report["filters"]["shape"][2],
        color_by=html.escape(report["color_by"]), map=map_html, map_tracks=map_tracks, **sections,
    )


def summary_line(summary: Mapping[str, Any]) -> str:
    """One sentence on a :func:`sonicrec.analysis.non_randomness` summary: the strongest playlist
    and the count of significant ones."""
    best = summary["strongest"]
    if best is None:
        return "no catalog metadata (instrument_family, style) to compare the playlists with"
    return (
        f"strongest: {_KIND_NAMES[best['kind']].format(best['key'])}: {best['field']} {best['value']!r} "
        f"{best['count']}/{best['n']} vs {100 * best['catalog_rate']:.0f}% of the tracks it was drawn from "
        f"(lift {best['lift']:.1f}, hypergeometric p {best['p_hypergeom']:.2g}, p against random playlists "
        f"{best['p_random']:.2g}, Bonferroni over {summary['tests']} tests {best['p_bonferroni']:.2g}); "
        f"{len(summary['significant'])}/{summary['tests']} (playlist, field) pairs significant at 5% "
        "after the correction"
    )


def _playlist_section(report: Mapping[str, Any], kind: str, tracks: pd.DataFrame, out: Path) -> str:
    """One kind of playlist: the sentence on their concentration, then the playlists side by side."""
    summary = report["non_randomness"][kind]
    line = summary_line(summary)
    verdict = html.escape(line[0].upper() + line[1:])
    lists = "".join(_playlist_html(p, tracks, out, tests=summary["tests"]) for p in report["playlists"][kind])
    return f"<p class='note'>{verdict} (in red).</p><div class='lists'>{lists}</div>"


def _playlist_html(playlist: Mapping[str, Any], tracks: pd.DataFrame, out: Path, *, tests: int) -> str:
    """One playlist of ``report.json``: its filter image, heading, concentration and players."""
    kind, key = playlist["kind"], playlist["key"]
    if kind == "similar":
        heading = f"Songs like {_describe(str(key), tracks)}"
    else:
        name = "unit" if kind == "unit" else "filter"
        heading = (f"{name} {key} <span class='note'>({_HOW[kind]}; "
                   f"selectivity {playlist['selectivity']:.1f})</span>")
    image = (f"<img class='filter' src='filter-{int(key):03d}.png' alt='filter {key}'>"
             if kind.startswith("filter") else "")
    rows = []
    for i, entry in enumerate(playlist["entries"]):
        t, score, at = entry["track_id"], entry["score"], entry.get("peak_seconds")
        src = _audio_src(tracks["path"].get(t) if t in tracks.index else None, out, at)
        player = f"<audio controls preload='none' src='{html.escape(src)}'></audio>" if src else "no audio"
        when = f"peak {at:.1f} s" if at is not None else ""
        shown = f"{score:.3f}" if kind == "similar" else f"{score:.3g}"  # cosines near 1
        rows.append(f"<tr><td>{i + 1}</td><td>{_describe(t, tracks)}</td><td>{shown}</td>"
                    f"<td>{when}</td><td>{player}</td></tr>")
    conc = _concentration_html(playlist["concentration"], tests)
    return (f"<div class='list'>{image}<div><h3>{heading}</h3>{conc}"
            f"<table>{''.join(rows)}</table></div></div>")


def _concentration_html(concentration: Mapping[str, Mapping[str, Any]], tests: int) -> str:
    """One line per catalog field; red when significant after Bonferroni over ``tests`` tests."""
    parts = []
    for f, s in concentration.items():
        sig = s["p_random"] * tests < 0.05
        parts.append(
            f"<span class='{'sig' if sig else ''}'>{html.escape(f)}: {html.escape(s['value'])} "
            f"{s['count']}/{s['n']} vs {100 * s['catalog_rate']:.0f}% (lift {s['lift']:.1f}, "
            f"p<sub>hyp</sub>={s['p_hypergeom']:.1g}, p<sub>rand</sub>={s['p_random']:.1g})</span>"
        )
    return f"<div class='conc'>{'<br>'.join(parts)}</div>"


def _map_html(points: Sequence[Mapping[str, Any]], tracks: pd.DataFrame, out: Path) -> tuple[str, str]:
    """The legend and the SVG scatter of the map's points, and the points' tracks as JSON for the
    page's script (title, label, audio link)."""
    xy = np.array([[p["x"], p["y"]] for p in points], dtype=np.float64)  # (n, 2)
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    px = MAP_PAD + (xy[:, 0] - lo[0]) / span[0] * (MAP_WIDTH - 2 * MAP_PAD)
    py = MAP_PAD + (hi[1] - xy[:, 1]) / span[1] * (MAP_HEIGHT - 2 * MAP_PAD)
    shown, colours = label_colours(pd.Series([p["label"] for p in points], dtype=object))
    infos, circles = [], []
    for i, p in enumerate(points):
        t, label = p["track_id"], p["label"]
        title = str(tracks["title"].get(t) or t) if t in tracks.index else t
        path = tracks["path"].get(t) if t in tracks.index else None
        infos.append({"id": t, "title": title, "label": label, "src": _audio_src(path, out)})
        circles.append(
            f"<circle cx='{px[i]:.1f}' cy='{py[i]:.1f}' r='4' fill='{colours[shown.iloc[i]]}' data-i='{i}'>"
            f"<title>{html.escape(title)} — {html.escape(label)}</title></circle>"
        )
    legend = "".join(f"<span><i class='sw' style='background:{c}'></i>{html.escape(v)}</span>"
                     for v, c in colours.items())
    svg = (f"<svg id='map-svg' width='{MAP_WIDTH}' height='{MAP_HEIGHT}' "
           f"viewBox='0 0 {MAP_WIDTH} {MAP_HEIGHT}'>{''.join(circles)}</svg>")
    page = (
        f"<div class='legend'>{legend}</div><div id='map-wrap'>{svg}"
        "<div><div id='map-info' class='note'>Hover over a point to see the track; click to play it.</div>"
        "<audio id='map-player' controls preload='none'></audio></div></div>"
    )
    return page, json.dumps(infos).replace("</", "<\\/")


def _describe(track_id: str, tracks: pd.DataFrame) -> str:
    """A track's title in bold, then its artist, style and instrument family."""
    if track_id not in tracks.index:
        return html.escape(track_id)
    row = tracks.loc[track_id]
    title = html.escape(str(row.get("title") or track_id))
    extra = [str(row[c]) for c in ("artist", "style", "instrument_family") if isinstance(row.get(c), str)]
    return f"<b>{title}</b> <span class='note'>{html.escape(' · '.join(extra))}</span>"


def _audio_src(path: Any, out: Path, at: float | None = None) -> str | None:
    """The URL of an audio file relative to ``out``, with a ``#t=`` start; None without a path."""
    if not isinstance(path, str) or not path:
        return None
    rel = os.path.relpath(Path(path).resolve(), out.resolve())
    return quote(Path(rel).as_posix()) + (f"#t={at:.1f}" if at is not None else "")
