"""The ``sonicrec`` command.

Heavy libraries (torch, implicit, music21 ...) are imported inside the command functions only, so
``sonicrec --help`` stays fast. Each command is a pair: ``_add_NAME(subparsers)`` declares its
arguments and ``_run_NAME(args)`` does the work; ``_COMMANDS`` lists them in help order.
Errors the user can fix (``SonicrecError``) print one line (:func:`error_line`: the library's
remedy phrased as the command and flags to use) and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from sonicrec import __version__
from sonicrec.config import TRAIN_LOSSES, check_seed
from sonicrec.errors import ChooseOutput, ConfigError, Remedy, RunStage, SetOption, SonicrecError

log = logging.getLogger("sonicrec")

#: The command that runs each stage of ``errors.STAGES``.
_STAGE_COMMANDS = {
    "ingest": "sonicrec ingest PATH... --out {run}",
    "plays": "sonicrec factorize --plays FILE --out {run}",
    "factorize": "sonicrec factorize {run}",
    "train": "sonicrec train {run}",
    "predict": "sonicrec predict {run} --catalog --name {model}",
    "analyse": "sonicrec analyse {run}",
}

#: Library options the command line sets with flags: (key, value) -> advice.
_OPTION_ADVICE = {
    ("cf.engine", "implicit"): "or use --engine implicit",
    ("on_bad", "skip"): "or skip them: leave out --strict",
    ("user_col/track_col/count_col", None):
        "name the user/track/count columns (--user-col/--track-col/--count-col)",
    ("tracks", "all"): "choose --tracks all or a shorter --length",
}


def _remedy_advice(remedy: Remedy) -> str:
    """A library remedy as the command or flags to use."""
    if isinstance(remedy, RunStage):
        command = _STAGE_COMMANDS[remedy.stage].format(run=remedy.run or "RUN", model=remedy.model or "MODEL")
        return f"run `{command}` first"
    if isinstance(remedy, ChooseOutput):
        extra = ", or empty it" if remedy.or_empty else ""
        extra += ", or replace them with --force" if remedy.or_replace else ""
        return f"choose another --out{extra}"
    if isinstance(remedy, SetOption):
        default = f"set {remedy.key} in RUN/config.toml"
        return _OPTION_ADVICE.get((remedy.key, remedy.value), default)
    return "check the file or remove it"


def error_line(exc: SonicrecError) -> str:
    """The message of ``exc`` with its remedy phrased for the command line."""
    if exc.remedy is None:
        return str(exc)
    return f"{exc.message}; {_remedy_advice(exc.remedy)}"


def _with_options(section, **options):
    """The config dataclass ``section`` with the options given on the command line (not None) set."""
    return dataclasses.replace(section, **{k: v for k, v in options.items() if v is not None})


class _IntermixedParser(argparse.ArgumentParser):
    """A command's parser that takes options between positional arguments too
    (``predict RUN --name M a.ogg b.ogg``: argparse alone stops taking files at the first option)."""

    _inside = False

    def parse_known_args(self, args=None, namespace=None):
        nested = any(a.nargs in (argparse.PARSER, argparse.REMAINDER) for a in self._actions)
        if self._inside or nested:  # intermixed parsing calls back here; it cannot take subcommands
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"port {value} is not in 1-65535")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def _nonnegative_int(text: str) -> int:
    return 0 if text.strip() == "0" else _positive_int(text)


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed {text!r} is not an integer") from None
    try:
        return check_seed(value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# --- demo ---------------------------------------------------------------------------------------


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="build the demo world and run the whole pipeline on it",
        description=(
            "Render real scores (music21 corpus) to audio, simulate listeners (SIMULATED play "
            "counts), and run every stage of sonicrec on them."
        ),
    )
    p.add_argument("--out", type=Path, default=Path("sonicrec-demo"), help="run directory")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", const="quick", dest="size", default="default",
                      help="small world and short training (under a minute with cached audio)")
    size.add_argument(
        "--size", choices=("quick", "default", "large"), default="default",
        help="default: 1,200 tracks, 5,000 simulated users; large: 10,000 tracks, 50,000 simulated "
        "users, 2.5M plays (rendering ~45 CPU-minutes the first time)",
    )
    p.add_argument("--tracks", type=_positive_int, help="number of tracks (overrides the preset)")
    p.add_argument("--users", type=_positive_int, help="number of simulated users")
    p.add_argument("--plays", type=_positive_int, help="number of simulated play events")
    p.add_argument("--seed", type=_seed, default=0, help="seed of everything random")
    p.add_argument(
        "--production", choices=("clean", "varied"), default="clean",
        help="clean: one soundfont and mix; varied: per-track soundfont (with fluid-soundfont-gm "
        "installed), drums, EQ, compression, noise floor and level",
    )
    p.add_argument("--cache", type=Path, help="rendered-audio cache (default ~/.cache/sonicrec)")
    p.add_argument("--serve", action="store_true", help="then open the web app on http://127.0.0.1:8000/")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> None:
    from sonicrec.demo import DemoOptions, run_demo

    options = DemoOptions.preset(
        size=args.size,
        n_tracks=args.tracks,
        n_users=args.users,
        n_plays=args.plays,
        seed=args.seed,
        production=args.production,
        cache_dir=args.cache,
        show_progress=args.progress,
    )
    summary = run_demo(args.out, options)
    print(summary)
    if args.serve:
        _serve(args.out, host="127.0.0.1", port=8000, progress=args.progress)


# --- ingest -------------------------------------------------------------------------------------


def _add_ingest(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="extract log-mel features of audio files into a run's feature store",
        description=(
            "Register audio files, folders or CSV/TSV manifests (track_id,path[,title,artist]) in "
            "RUN/catalog.sqlite and extract their log-mel spectrograms into RUN/features/. "
            "Re-running skips finished tracks and resumes an interrupted run; bad files are "
            "recorded as failed (see --report)."
        ),
    )
    p.add_argument(
        "paths", nargs="*", type=Path, metavar="PATH",
        help="audio file, folder or manifest (none: the catalog's pending tracks)",
    )
    p.add_argument("--out", type=Path, metavar="RUN", help="run directory")
    p.add_argument("--workers", type=_positive_int, help="worker processes (default: CPU cores)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad file")
    p.add_argument("--retry-failed", action="store_true", help="try failed tracks again")
    p.add_argument(
        "--report", type=Path, metavar="RUN",
        help="list the failed tracks of RUN with their reasons: id, path, reason separated by tabs, "
        "with tabs, newlines and backslashes in them written \\t, \\n, \\\\",
    )
    p.add_argument("--json", action="store_true", help="--report: JSON instead of tab-separated lines")
    p.add_argument(
        "--engine", choices=("local", "spark"), default="local",
        help="local worker processes (default) or a Spark job (sonicrec[spark])",
    )
    p.add_argument("--master", metavar="URL", help="--engine spark: Spark master (default: cf.spark_master)")
    p.add_argument("--partitions", type=_positive_int, help="--engine spark: Spark tasks")
    p.set_defaults(func=_run_ingest)


def _escape_field(text: str) -> str:
    """One field of a tab-separated line: backslash, tab, CR and newline escaped as in C."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _run_ingest(args: argparse.Namespace) -> None:
    import json
    import os

    from sonicrec.catalog import Catalog
    from sonicrec.errors import DataError, OutputDirError
    from sonicrec.features import discover_tracks, ingest_report, ingest_run, register_tracks
    from sonicrec.rundir import RunDir

    if args.report is not None:
        report = ingest_report(args.report)
        failed, counts = report.failed, report.counts
        if args.json:
            print(json.dumps({"failed": failed, "counts": counts}, indent=1))
            return
        for row in failed:
            print("\t".join(_escape_field(str(value)) for value in row.values()))
        print(f"{counts['ok']} ok, {counts['failed']} failed, {counts['new']} not yet extracted")
        return
    if args.out is None:
        raise OutputDirError("give the run directory: sonicrec ingest PATH... --out RUN")
    if not args.paths and not RunDir(args.out).catalog.is_file():
        raise DataError("nothing to ingest: give audio files, folders or a manifest")
    run = RunDir.prepare(args.out)
    cfg = run.read_config()
    if not run.config.is_file():
        cfg.save(run.config)
    with Catalog(run.catalog) as catalog:
        log.info("%d new tracks registered", register_tracks(catalog, discover_tracks(args.paths)))
    if args.engine == "spark":
        from sonicrec.spark import ingest_run_spark

        result = ingest_run_spark(
            run, cfg.audio, master=args.master, partitions=args.partitions, strict=args.strict,
            retry_failed=args.retry_failed, show_progress=args.progress,
        )
    else:
        result = ingest_run(
            run, cfg.audio, workers=args.workers or os.cpu_count() or 1, strict=args.strict,
            retry_failed=args.retry_failed, show_progress=args.progress,
        )
    failed = ingest_report(run).counts["failed"]
    line = f"{result.ok} ok, {result.failed} failed"
    if result.skipped:
        line += f" ({result.skipped} done or failed before)"
    if failed:
        line += f", see sonicrec ingest --report {run.root}"
    print(line)


# --- factorize ----------------------------------------------------------------------------------


def _add_factorize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "factorize",
        help="WMF of play counts: user and song factors with a cold-start song split",
        description=(
            "Split songs into train/valid/test (seeded), fit weighted matrix factorisation "
            "(confidence 1 + alpha log(1 + count/epsilon)) on the train songs, fold in the others "
            "and save RUN/cf/factors.npz; then print held-out-play ranking metrics of WMF and "
            "popularity. Works on RUN_DIR/plays.parquet, or reads --plays FILE into a new run "
            "directory --out DIR."
        ),
    )
    p.add_argument("run_dir", nargs="?", type=Path, metavar="RUN_DIR", help="run directory")
    p.add_argument("--plays", type=Path, metavar="FILE", help="play-count file to read (needs --out)")
    p.add_argument(
        "--format", default="triplets", help="--plays format: triplets, lastfm1k, lastfm360k, csv, parquet"
    )
    p.add_argument("--out", type=Path, metavar="DIR", help="run directory to create for --plays")
    p.add_argument(
        "--force", action="store_true",
        help="--plays into a run that already has play counts: replace them (its models become stale)",
    )
    p.add_argument("--user-col", default="user_id", help="csv/parquet: user column (default user_id)")
    p.add_argument("--track-col", default="track_id", help="csv/parquet: item column (default track_id)")
    p.add_argument(
        "--count-col", default="count", help="csv/parquet: count column (default count; '' = 1 play per row)"
    )
    p.add_argument("--delimiter", help="csv: field delimiter (default: sniffed from the header)")
    p.add_argument("--strict", action="store_true", help="stop at malformed rows instead of skipping them")
    p.add_argument("--engine", choices=("implicit", "spark"), help="ALS engine (default: cf.engine)")
    p.add_argument("--spark-master", metavar="URL", help="Spark master (default: cf.spark_master)")
    p.add_argument("--factors", type=_positive_int, help="latent factors")
    p.add_argument("--alpha", type=float, help="confidence scale alpha")
    p.add_argument("--epsilon", type=float, help="confidence count scale epsilon")
    p.add_argument("--reg", type=float, help="L2 regularisation lambda")
    p.add_argument("--iterations", type=_positive_int, help="ALS iterations")
    p.add_argument("--seed", type=_seed, help="seed of the song split, ALS init and held-out plays")
    p.add_argument("--eval-k", type=_positive_int, default=50, help="cut-off k of held-out metrics")
    p.add_argument(
        "--eval-fraction", type=float, default=0.2, help="share of (user, song) pairs held out (0.2)"
    )
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation (a second fit)")
    p.set_defaults(func=_run_factorize)


def _run_factorize(args: argparse.Namespace) -> None:
    from sonicrec.cf import evaluate_heldout, factorize_run
    from sonicrec.errors import ConfigError
    from sonicrec.interactions import import_plays_run, read_play_matrix
    from sonicrec.rundir import RunDir

    if (args.plays is None) == (args.run_dir is None):
        raise ConfigError("give either RUN_DIR or --plays FILE --out DIR")
    if args.plays is not None and args.out is None:
        raise ConfigError("--plays needs --out DIR: the run directory to write")
    if args.plays is not None:
        plays = import_plays_run(
            args.out, args.plays, args.format, replace=args.force, user_col=args.user_col,
            track_col=args.track_col, count_col=args.count_col or None, delimiter=args.delimiter,
            on_bad="error" if args.strict else "skip", show_progress=args.progress,
        )
    run = RunDir(args.out if args.plays is not None else args.run_dir)
    if args.plays is None:
        plays = read_play_matrix(run.plays, "parquet", on_bad="error", show_progress=args.progress)
    cfg = run.read_config()
    cf = _with_options(
        cfg.cf, engine=args.engine, spark_master=args.spark_master, factors=args.factors, alpha=args.alpha,
        epsilon=args.epsilon, regularization=args.reg, iterations=args.iterations, seed=args.seed,
    )
    factors = factorize_run(run, cf, plays=plays, show_progress=args.progress)
    sizes = ", ".join(f"{s} {len(factors.songs(s))}" for s in ("train", "valid", "test"))
    print(f"{run.factors}: {len(factors.user_ids)} users, {len(factors.song_ids)} songs ({sizes}), "
          f"{factors.n_factors} factors, engine {cf.engine}")
    if args.no_eval:
        return
    results = evaluate_heldout(
        plays, cf, k=args.eval_k, fraction=args.eval_fraction, show_progress=args.progress
    )
    k = results["wmf"]["k"]
    if k < args.eval_k:
        print(f"--eval-k {args.eval_k} is more than the {k} songs: metrics at k = {k}")
    print(f"held-out plays ({args.eval_fraction:.0%} of user-song pairs, WMF refitted without them):")
    print(f"  {'':<11}{'P@' + str(k):>9}{'mAP@' + str(k):>9}{'NDCG@' + str(k):>9}{'AUC@' + str(k):>9}")
    for name, m in results.items():
        print(f"  {name:<11}{m['precision']:>9.4f}{m['map']:>9.4f}{m['ndcg']:>9.4f}{m['auc']:>9.4f}")


# --- factors import -----------------------------------------------------------------------------


def _add_factors(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "factors",
        help="bring your own CF factors: import song (and user) factors another pipeline fitted",
        description="Work on a run's collaborative-filtering factors.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    q = actions.add_parser(
        "import",
        help="song (and user) factors from .npy + id list, .npz, Parquet/CSV, implicit or Spark ALS",
        description=(
            "Check and write imported factors as RUN/cf/factors.npz, with a cold-start split from "
            "--split or drawn (seeded by cf.seed) among the imported songs that have features. "
            "Formats: .npy (rows named by --song-ids/--user-ids), .npz (implicit's model.save(), "
            "rows named by the id lists; or one id array and one matrix), Parquet (a file, or the "
            "folder Spark writes for ALS itemFactors/userFactors: id, features) or CSV (an id "
            "column and a list column or one column per dimension). Integer ids of a table are "
            "positions in the id list when one is given. Sets cf.factors in RUN/config.toml."
        ),
    )
    q.add_argument("run_dir", type=Path, metavar="RUN", help="run directory (usually already ingested)")
    q.add_argument("--songs", type=Path, required=True, metavar="FILE", help="song (item) factors")
    q.add_argument("--users", type=Path, metavar="FILE", help="user factors (needed to rank users)")
    q.add_argument("--song-ids", type=Path, metavar="FILE", help="song ids, one per line, in row order")
    q.add_argument("--user-ids", type=Path, metavar="FILE", help="user ids, one per line, in row order")
    q.add_argument("--id-col", help="id column of Parquet/CSV tables (default: id, track_id, ...)")
    q.add_argument("--split", type=Path, metavar="FILE",
                   help="CSV track_id,split (train/valid/test; songs not listed are train)")
    q.set_defaults(func=_run_factors_import)


def _run_factors_import(args: argparse.Namespace) -> None:
    from sonicrec.factor_import import import_factors_run
    from sonicrec.rundir import RunDir

    report = import_factors_run(
        args.run_dir, args.songs, users=args.users, song_ids=args.song_ids, user_ids=args.user_ids,
        id_col=args.id_col, split_path=args.split,
    )
    sizes = ", ".join(f"{s} {n}" for s, n in report.split_counts.items())
    print(f"imported {report.n_songs} songs ({sizes}) and {report.n_users} users, {report.n_factors} factors")
    if report.n_with_features is not None:
        lacking = report.n_songs - report.n_with_features
        shown = f" (e.g. {', '.join(report.without_features)})" if lacking else ""
        print(f"{report.n_with_features} songs have features, {lacking} do not{shown}; "
              f"{report.n_features_without_factors} stored songs have no imported factors")
    print(f"written: {RunDir(args.run_dir).factors}, import.json")


# --- recommend / audience / similar -----------------------------------------------------------


def _add_ranking_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory")
    p.add_argument("--n", type=_positive_int, default=10, help="number of results (default 10)")
    p.add_argument("--model", default="cnn-mse", help="model whose predicted factors place cold songs")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--raw", action="store_true",
                   help="raw scores: no fair merge of played and never-played songs, no hubness reduction")
    p.add_argument(
        "--blend-below", type=_nonnegative_int, metavar="N",
        help="place train songs with fewer than N listeners, and new songs with plays, by the warm-up "
        "blend of their plays and their audio (default 50; 0: CF factors and predictions as they are)",
    )


def _load_recommender(args: argparse.Namespace):
    from sonicrec.recommend import Recommender

    options = {} if args.blend_below is None else {"warmup_below": args.blend_below}
    return Recommender.load(args.run_dir, args.model, show_progress=args.progress, **options)


def _show_ranking(
    args: argparse.Namespace, rec, ranking, query: str, columns: dict, familiarity: dict | None = None
) -> None:
    """Print a Ranking with catalog metadata (songs) as a table or JSON; ``columns`` adds fields;
    ``familiarity``: how familiar an audio-file query is to the model (Recommender.familiarity)."""
    import json

    songs = args.command != "audience"
    key = "track_id" if songs else "user_id"
    info = rec.metadata(ranking.ids) if songs else [{}] * len(ranking.ids)
    rows = []
    for i, (item, score) in enumerate(zip(ranking.ids.tolist(), ranking.scores.tolist(), strict=True)):
        row = {"rank": i + 1, key: item, "score": round(score, 4)}
        if songs:
            row["split"] = rec.split_of(item)
        row.update({name: values[i] for name, values in columns.items()})
        rows.append(row | info[i])
    if args.json:
        out = {"command": args.command, "query": query, "model": args.model, "results": rows}
        print(json.dumps(out | ({"familiarity": familiarity} if familiarity else {}), indent=2))
        return
    print(f"{args.command} {query} (model {args.model}):")
    if familiarity:
        verdict = "familiar" if familiarity["familiar"] else f"UNFAMILIAR: {familiarity['message']}"
        print(f"  {verdict} (distance {familiarity['distance']} from the training songs, threshold "
              f"{familiarity['threshold']}; farther than {familiarity['percentile']}% of held-out songs)")
        if not familiarity["familiar"] and getattr(rec.predictor, "adapted_from", None) is None:
            print(f"  with a few dozen recordings like this one: `sonicrec adapt {args.run_dir} FILES... "
                  f"--model {args.model}`, then query with --model {args.model}-adapted")
    for row in rows:
        title = " - ".join(str(row[k]) for k in ("title", "artist") if row.get(k))
        where = f" ({row['collection']})" if row.get("collection") else ""
        split = f" [{row['split']}]" if songs else ""
        extra = "  ".join(f"{name}={row[name]}" for name in columns)
        print(f"{row['rank']:3d}. {row['score']:8.4f}  {row[key]}{split}  {title}{where}  {extra}".rstrip())


def _add_recommend(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "recommend",
        help="songs for a user: played and never-played songs ranked together",
        description="Rank warm songs (true CF factors) and cold songs (factors predicted from audio) "
        "for one user.",
    )
    _add_ranking_options(p)
    p.add_argument("--user", required=True, help="user id")
    p.add_argument("--warm-only", action="store_true", help="leave out never-played (cold) songs")
    p.add_argument("--include-played", action="store_true", help="keep songs the user has played")
    p.add_argument("--outliers", action="store_true",
                   help="score how far each song sounds from the rest of the list (flag_outliers)")
    p.set_defaults(func=_run_recommend)


def _run_recommend(args: argparse.Namespace) -> None:
    rec = _load_recommender(args)
    ranking = rec.recommend(
        args.user, args.n, include_cold=not args.warm_only, exclude_played=not args.include_played,
        raw=args.raw,
    )
    columns = {}
    if args.outliers:
        flags = rec.flag_outliers(ranking)
        columns = {"outlier_score": [round(float(s), 2) for s in flags.score],
                   "outlier": flags.flagged.tolist()}
    _show_ranking(args, rec, ranking, args.user, columns)


def _add_audience(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audience",
        help="the users most likely to enjoy a song or a new audio file",
        description="Rank users for a track id of the run, or for a new audio file (through the model).",
    )
    _add_ranking_options(p)
    p.add_argument("song", metavar="FILE|ID", help="an audio file or a track id")
    p.set_defaults(func=_run_song_query)


def _run_song_query(args: argparse.Namespace) -> None:
    """``audience`` and ``similar``: a Recommender question about one song or audio file."""
    rec = _load_recommender(args)
    ranking = getattr(rec, args.command)(args.song, args.n, raw=args.raw)
    _show_ranking(args, rec, ranking, args.song, {}, rec.familiarity(args.song))


def _add_similar(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "similar",
        help="a similar-songs playlist for a song or an audio file",
        description="Songs nearest to a track id or a new audio file in the latent space (cosine, "
        "hub-corrected by CSLS, played and never-played songs merged fairly; --raw: cosine alone), "
        "the query track first.",
    )
    _add_ranking_options(p)
    p.add_argument("song", metavar="FILE|ID", help="an audio file or a track id")
    p.set_defaults(func=_run_song_query)


# --- export -------------------------------------------------------------------------------------


def _what_list(text: str) -> tuple[str, ...]:
    from sonicrec.export import WHAT

    parts = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [p for p in parts if p not in WHAT]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {','.join(WHAT)}")
    return parts


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="predicted factors, neighbour and top-N lists as Parquet, the song index as a voyager file",
        description=(
            "Write RUN/export/MODEL/: predictions.parquet (track_id, vector), neighbours.parquet "
            "(track_id, neighbour_ids, scores), topn.parquet (user_id, track_ids, scores) and "
            "index/songs|users/{index.hnsw,names.json}, voyager indexes that voyager's Python "
            "Index.load and Java StringIndex.load open as they are (docs/service.md)."
        ),
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory")
    p.add_argument("--what", type=_what_list, default="predictions,neighbours,topn,index",
                   help="comma-separated: predictions,neighbours,topn,index (default: all)")
    p.add_argument("--model", default="cnn-mse", help="model whose predicted factors place cold songs")
    p.add_argument("--n", type=_positive_int, default=50, help="length of neighbour and top-N lists (50)")
    p.add_argument("--out", type=Path, help="output folder (default RUN/export/MODEL)")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> None:
    from sonicrec.export import export_run

    what = _what_list(args.what) if isinstance(args.what, str) else args.what
    written = export_run(args.run_dir, model=args.model, what=what, n=args.n, out=args.out,
                         show_progress=args.progress)
    for name, path in written.items():
        print(f"{name}: {path}")


# --- baselines / evaluate -----------------------------------------------------------------------


def _add_baselines(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "baselines",
        help="fit the MFCC bag-of-words baselines (linear, MLP) of a run",
        description=(
            "MFCCs from RUN/features, a k-means vocabulary, per-track word histograms, PCA, then "
            "ridge regression and an MLP trained on the training songs' unit-normalised factors "
            "(RUN/cf/factors.npz). Writes RUN/predictions/mfcc-linear.npz and mfcc-mlp.npz."
        ),
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the vocabulary and the MLP")
    p.add_argument("--words", type=_positive_int, help="vocabulary size (default 1000)")
    p.set_defaults(func=_run_baselines)


def _run_baselines(args: argparse.Namespace) -> None:
    from sonicrec.baselines import BagOfWordsConfig, fit_baselines_run

    cfg = _with_options(BagOfWordsConfig(), n_words=args.words)
    paths = fit_baselines_run(args.run_dir, seed=args.seed, show_progress=args.progress, cfg=cfg)
    for name, path in paths.items():
        print(f"{name}: {path}")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="cold-start evaluation: mAP@500, AUC, NDCG, recall of every model on held-out songs",
        description=(
            "Rank the held-out songs for every user by user factor . song factor, for every "
            "RUN/predictions/*.npz, the random and popularity baselines and the upper bound (true "
            "CF factors), against the users' real plays. Writes RUN/evaluation/results.json, "
            "results.md and results.png and prints the table."
        ),
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory")
    p.add_argument("--split", choices=("test", "valid"), default="test", help="songs to rank")
    p.add_argument("-k", type=_positive_int, default=50, help="cutoff of NDCG@k and recall@k (50)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the random baseline and the bootstrap")
    p.add_argument(
        "--bootstrap", type=_nonnegative_int, default=1000, metavar="N",
        help="bootstrap resamples of the users for 95%% intervals and paired differences (0: none)",
    )
    p.add_argument("--description", help="what the data is, written above the table")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> None:
    from sonicrec.evaluate import evaluate_run, results_markdown
    from sonicrec.rundir import RunDir

    run = RunDir(args.run_dir)
    results = evaluate_run(
        run, split=args.split, k=args.k, seed=args.seed, n_resamples=args.bootstrap,
        description=args.description, show_progress=args.progress,
    )
    print(results_markdown(results, description=results.get("description")))
    chart = "" if "not_computed" in results else ", results.png"
    print(f"written: {run.evaluation / 'results.json'}, results.md{chart}")


# --- study / learning-curve ---------------------------------------------------------------------


def _add_experiment_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", type=Path, metavar="RUN", help="run with features and plays (e.g. a demo run)")
    p.add_argument("--out", type=Path, required=True, help="directory of the experiment's runs")
    p.add_argument(
        "--losses", nargs="+", choices=("mse", "wpe"), help="CNN losses to train (study: mse wpe; curve: mse)"
    )
    p.add_argument(
        "--bootstrap", type=_nonnegative_int, default=1000, metavar="N",
        help="bootstrap resamples of the users per evaluation (0: no intervals)",
    )


def _add_study(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "study",
        help="repeat split, factorisation, training and evaluation over seeds; mean ± sd table",
        description=(
            "For each seed, a run OUT/seed-N linked to RUN's features and plays: a new song split and "
            "WMF, the CNNs, the MFCC baselines and the cold-start evaluation. Writes OUT/study.md "
            "(mean ± sd across seeds, paired differences pooled over seeds, per-seed mAP) and "
            "OUT/study.json. Finished seeds are kept: re-run the same command to resume."
        ),
    )
    _add_experiment_options(p)
    p.add_argument("--seeds", nargs="+", type=_seed, default=[0, 1, 2], help="seeds (0 1 2)")
    p.set_defaults(func=_run_study)


def _run_study(args: argparse.Namespace) -> None:
    from sonicrec.study import run_seeds, study_markdown

    result = run_seeds(args.base, args.out, args.seeds, losses=args.losses or ("mse", "wpe"),
                       n_resamples=args.bootstrap, show_progress=args.progress)
    print(study_markdown(result))
    print(f"written: {args.out / 'study.md'}, study.json; per seed: {args.out}/seed-N/evaluation/")


def _add_learning_curve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "learning-curve",
        help="content models trained on fewer training songs, evaluated on the same test songs",
        description=(
            "For each size N, a run OUT/train-N with RUN's factors but only N of its training songs "
            "(nested seeded subsets): the CNN and the MFCC baselines trained on them and evaluated on "
            "RUN's test songs. Writes OUT/learning_curve.md, .json and .png; finished sizes are kept."
        ),
    )
    _add_experiment_options(p)
    p.add_argument("--sizes", nargs="+", type=_positive_int, required=True, help="training songs per point")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the subsets, training and bootstrap")
    p.set_defaults(func=_run_learning_curve)


def _run_learning_curve(args: argparse.Namespace) -> None:
    from sonicrec.study import curve_markdown, run_learning_curve

    curve = run_learning_curve(
        args.base, args.out, args.sizes, seed=args.seed, losses=args.losses or ("mse",),
        n_resamples=args.bootstrap, show_progress=args.progress,
    )
    print(curve_markdown(curve))
    print(f"written: {args.out / 'learning_curve.md'}, learning_curve.json, learning_curve.png")


def _add_warmup(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "warmup",
        help="the warm-up curve: test songs placed by their first 1-50 listeners (fold-in, audio, blend)",
        description=(
            "Reveal 1, 2, 5, 10, 20, 50 listeners of every test song (seeded), place the song by the "
            "fold-in from their plays, by its audio prediction and by their blend, and rank the other "
            "users for it (mAP@500, AUC over its remaining listeners). Writes "
            "RUN/evaluation/warmup.json, warmup.md and warmup.png."
        ),
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory")
    p.add_argument("--model", default="cnn-mse", help="model whose predictions are the audio part")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the revealed listeners")
    p.set_defaults(func=_run_warmup)


def _run_warmup(args: argparse.Namespace) -> None:
    from sonicrec.warmup import curve_markdown, warmup_curve_run

    print(curve_markdown(warmup_curve_run(args.run_dir, args.model, seed=args.seed)))
    print(f"written: {args.run_dir / 'evaluation' / 'warmup.json'}, warmup.md, warmup.png")


# --- train / predict ----------------------------------------------------------------------------


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train the CNN that predicts song factors from log-mel spectrograms",
        description=(
            "Train on RUN/features with the 'train' songs of RUN/cf/factors.npz as targets "
            "(unit-normalised factors for --loss mse; play counts of RUN/plays.parquet and the user "
            "factors for --loss wpe and the ranking losses), validating on the 'valid' songs after "
            "every epoch. Settings come from RUN/config.toml ([model], [train]); the options below "
            "override them. "
            "Writes RUN/model/NAME/checkpoint.pt and metrics.csv."
        ),
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory")
    p.add_argument("--name", help="model name (default: cnn-LOSS, '+' as '-': cnn-mse-bpr)")
    p.add_argument(
        "--loss", choices=TRAIN_LOSSES,
        help="objective: mse, wpe, or learning to rank with the user factors fixed (bpr, softmax, mse+bpr, "
        "mse+softmax; see sonicrec.losses)",
    )
    p.add_argument("--rank-weight", type=float, help="weight of the ranking term of mse+bpr / mse+softmax")
    p.add_argument("--rank-users", type=_positive_int, help="listeners drawn per song and step (ranking)")
    p.add_argument("--small", action="store_true", help="the small CPU-friendly model (ModelConfig.small)")
    p.add_argument("--epochs", type=_positive_int, help="maximum number of epochs")
    p.add_argument("--batch-size", type=_positive_int, help="songs per minibatch")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--optimizer", choices=("sgd", "adam"), help="sgd (Nesterov momentum) or adam")
    p.add_argument("--workers", type=int, help="DataLoader worker processes (0: load in the main one)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=_seed, help="seed of initialisation, order, crops and dropout")
    p.add_argument("--resume", action="store_true", help="continue from RUN/model/NAME/checkpoint.pt")
    p.add_argument(
        "--ddp", action="store_true",
        help="data-parallel training under torchrun (torchrun --nproc-per-node N --no-python sonicrec "
        "train RUN --ddp); train.batch_size is the global batch",
    )
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> None:
    from sonicrec.config import ModelConfig
    from sonicrec.rundir import RunDir
    from sonicrec.train import default_model_name, distributed_rank, train_run

    rank = distributed_rank(args.ddp)
    if rank != 0:  # torchrun: rank 0 alone reports
        args.progress = False
        logging.getLogger().setLevel(logging.WARNING)
    run = RunDir(args.run_dir)
    cfg = run.read_config()
    train = _with_options(
        cfg.train, loss=args.loss, epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
        optimizer=args.optimizer, num_workers=args.workers, device=args.device, seed=args.seed,
        rank_weight=args.rank_weight, rank_users=args.rank_users,
    )
    model = ModelConfig.small() if args.small else cfg.model
    result = train_run(
        run, cfg.replace(train=train, model=model), name=args.name or default_model_name(train.loss),
        resume=args.resume, show_progress=args.progress, ddp=args.ddp,
    )
    if rank != 0:
        return
    print(
        f"{result.loss}: best validation loss {result.best_valid:.5f} at epoch {result.best_epoch} "
        f"of {result.epochs} (mean-target baseline {result.baseline_valid:.5f}; "
        f"{result.train_songs} training, {result.valid_songs} validation songs)"
    )
    print(f"written: {result.checkpoint}, {result.metrics.name}")


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="predict song factors from audio files, or for every track of a run's feature store",
        description=(
            "With AUDIO files or track_id,path manifests (.csv/.tsv): decode them, compute log-mels "
            "with the front end the model was trained with, and write their factors to --out (keyed "
            "by the manifest's ids, or by file name without suffix, lengthened by folder names where "
            "two names clash). Files that cannot be used are listed at the end (--strict: stop at "
            "the first). With --catalog: predict every track of RUN/features into "
            "RUN/predictions/NAME.npz."
        ),
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory")
    p.add_argument("audio", nargs="*", type=Path, metavar="AUDIO", help="audio files or manifests")
    p.add_argument("--strict", action="store_true", help="AUDIO: stop at the first file that cannot be used")
    p.add_argument("--catalog", action="store_true", help="every track of the feature store")
    p.add_argument("--name", default="cnn-mse", help="model name (default cnn-mse)")
    p.add_argument("--checkpoint", type=Path, help="checkpoint file (default RUN/model/NAME/checkpoint.pt)")
    p.add_argument("--out", type=Path, help="output .npz for AUDIO files")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="clips per batch (64)")
    p.add_argument("--workers", type=_positive_int, default=2, help="decoding threads (2)")
    p.add_argument(
        "--engine", choices=("local", "spark"), default="local",
        help="--catalog: predict here (default) or as a Spark job, also writing RUN/predictions/NAME.parquet",
    )
    p.add_argument("--master", metavar="URL", help="--engine spark: Spark master (default: cf.spark_master)")
    p.add_argument("--partitions", type=_positive_int, help="--engine spark: Spark tasks")
    p.add_argument(
        "--from-audio", action="store_true",
        help="--engine spark: decode the catalog's audio files instead of reading RUN/features",
    )
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> None:
    from sonicrec.errors import DataError
    from sonicrec.rundir import RunDir

    run = RunDir(args.run_dir)
    if args.catalog == bool(args.audio):
        raise DataError("give either AUDIO files or --catalog")
    if args.engine == "spark" or args.from_audio:
        if not args.catalog or args.engine != "spark":
            raise DataError("--engine spark works with --catalog, --from-audio with --engine spark")
        from sonicrec.spark import predict_run_spark

        written = predict_run_spark(
            run, args.name, master=args.master, partitions=args.partitions, from_audio=args.from_audio,
            batch_size=args.batch_size, checkpoint=args.checkpoint, show_progress=args.progress,
        )
        print(f"written: {written[0]}, {written[1]}")
        return
    if args.catalog:
        from sonicrec.predict import predict_run

        written = predict_run(
            run, args.name, checkpoint=args.checkpoint, batch_size=args.batch_size,
            show_progress=args.progress,
        )
        print(f"written: {written}")
        return
    if args.out is None:
        raise DataError("give the output file for AUDIO predictions: --out FILE.npz")
    from sonicrec.predict import predict_audio

    result = predict_audio(
        args.checkpoint or run.checkpoint(args.name), args.audio, args.out,
        batch_size=args.batch_size, workers=args.workers,
        strict=args.strict, show_progress=args.progress,
    )
    for track_id, path, reason in result.failures:
        print(f"failed: {_escape_field(track_id)}\t{_escape_field(str(path))}\t{_escape_field(reason)}")
    failed = f", {len(result.failures)} failed" if result.failures else ""
    print(f"written: {result.path} ({result.n_predicted} tracks x {result.n_factors} factors{failed})")
    if result.unfamiliar:
        from sonicrec.familiarity import UNFAMILIAR_MESSAGE

        shown = ", ".join(result.unfamiliar[:5])
        print(f"{len(result.unfamiliar)} of {result.n_predicted} files are {UNFAMILIAR_MESSAGE} ({shown})")


def _add_adapt(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "adapt",
        help="adapt a trained model to recordings of another domain (no plays needed)",
        description=(
            "Adapt model --model to the audio of AUDIO files or track_id,path manifests, e.g. real "
            "recordings after a model trained on the demo's rendered audio: re-estimate its input "
            "standardisation and BatchNorm statistics on them (AdaBN) and map their predicted factors "
            "to the mean and covariance of the model's predictions for its training songs (CORAL). "
            "Writes model --name (default MODEL-adapted), for queries of that domain: "
            "`sonicrec similar RUN_DIR song.ogg --model NAME`. The run's songs stay placed by --model. "
            f"Needs at least {_min_adapt_tracks()} recordings; files that cannot be used are listed "
            "(--strict: stop at the first)."
        ),
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory")
    p.add_argument("audio", nargs="+", type=Path, metavar="AUDIO", help="audio files or manifests")
    p.add_argument("--model", default="cnn-mse", help="the model to adapt (default cnn-mse)")
    p.add_argument("--name", help="name of the adapted model (default MODEL-adapted)")
    p.add_argument("--strict", action="store_true", help="stop at the first file that cannot be used")
    p.add_argument("--workers", type=_positive_int, default=2, help="decoding threads (2)")
    p.set_defaults(func=_run_adapt)


def _min_adapt_tracks() -> int:
    from sonicrec.adapt import MIN_TRACKS

    return MIN_TRACKS


def _run_adapt(args: argparse.Namespace) -> None:
    from sonicrec.adapt import adapt_run

    result = adapt_run(
        args.run_dir, args.model, args.audio, name=args.name, strict=args.strict, workers=args.workers,
        show_progress=args.progress,
    )
    for path, reason in result.failures:
        print(f"failed: {_escape_field(str(path))}\t{_escape_field(reason)}")
    failed = f"; {len(result.failures)} files could not be used" if result.failures else ""
    print(f"written: {result.checkpoint} ({args.model} adapted to {result.n_tracks} recordings{failed})")


# --- analyse ------------------------------------------------------------------------------------


def _filter_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give filter numbers and commas, e.g. 3,17") from None


def _add_analyse(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyse",
        help="what the network learned: filter images, activation playlists, a t-SNE map (HTML report)",
        description=(
            "Write a self-contained report folder (index.html + PNGs + report.json, RUN/analysis/ by "
            "default): the first-layer filters, max- and mean-activation playlists of the most "
            "selective filters, playlists of last-hidden-layer units, a t-SNE map of the predicted "
            "factors and similar-song playlists, each track playable from the page."
        ),
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory")
    p.add_argument("--model", default="cnn-mse", help="model name (default cnn-mse)")
    p.add_argument("--out", type=Path, help="report folder (default RUN/analysis)")
    p.add_argument("--tracks", choices=("test", "valid", "train", "all"), default="test",
                   help="tracks the playlists are drawn from (default test: never trained on)")
    p.add_argument("--filters", type=_filter_list, default=[], metavar="N,N,...",
                   help="first-layer filters to add to the most selective ones")
    p.add_argument("--n-filters", type=_positive_int, default=8, help="most selective filters to show (8)")
    p.add_argument("--n-units", type=_positive_int, default=8, help="most selective hidden units to show (8)")
    p.add_argument("--queries", type=_positive_int, default=4, help="similar-song playlists (4)")
    p.add_argument("--length", type=_positive_int, default=10, help="tracks per playlist (10)")
    p.add_argument("--color-by", default="style",
                   help="catalog field colouring the map: style, collection, composer, instrument_family")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the map, query tracks and p-values")
    p.set_defaults(func=_run_analyse)


def _run_analyse(args: argparse.Namespace) -> None:
    import json

    from sonicrec.analysis import build_report
    from sonicrec.report_page import summary_line

    page = build_report(
        args.run_dir, model=args.model, out=args.out, tracks=args.tracks, filters=args.filters,
        n_filters=args.n_filters, n_units=args.n_units, n_queries=args.queries, length=args.length,
        color_by=args.color_by, seed=args.seed, show_progress=args.progress,
    )
    report = json.loads((page.parent / "report.json").read_text(encoding="utf-8"))
    for kind, summary in report["non_randomness"].items():
        print(f"{kind} playlists: {summary_line(summary)}")
    print(f"written: {page} ({report['seconds']['total']:.0f} s)")


# --- neighbours ---------------------------------------------------------------------------------


def _add_neighbours(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "neighbours",
        help="precompute every song's similar songs and every user's top songs (served without search)",
        description=(
            "Ask the run's indexes for the similar songs of every catalog song and the top songs of "
            "every user, and store them as memory-mapped arrays in RUN/neighbours/MODEL/. `serve`, "
            "`similar` and `recommend` answer from them when they hold the answer. Nothing is "
            "recomputed while the factors, predictions and plays are unchanged."
        ),
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory")
    p.add_argument("--model", default="cnn-mse", help="model whose predictions place cold songs (cnn-mse)")
    p.add_argument("--songs", type=_positive_int, default=25, help="neighbours stored per song (25)")
    p.add_argument("--users", type=_positive_int, default=50, help="songs stored per user (50)")
    p.add_argument("--force", action="store_true", help="recompute even when the lists are current")
    p.add_argument("--engine", choices=("local", "spark"), default="local",
                   help="this machine (default) or a Spark job (sonicrec[spark])")
    p.add_argument("--spark-master", metavar="URL",
                   help="--engine spark: Spark master (default: cf.spark_master)")
    p.set_defaults(func=_run_neighbours)


def _run_neighbours(args: argparse.Namespace) -> None:
    options = dict(songs=args.songs, users=args.users, force=args.force, show_progress=args.progress)
    if args.engine == "spark":
        from sonicrec.spark import neighbours_run_spark

        lists, computed = neighbours_run_spark(args.run_dir, args.model, master=args.spark_master, **options)
    else:
        from sonicrec.neighbours import neighbours_run

        lists, computed = neighbours_run(args.run_dir, args.model, **options)
    what = f"{len(lists.song_rows):,} songs x {lists.song_rows.shape[1]}, " \
           f"{len(lists.user_rows):,} users x {lists.user_rows.shape[1]}"
    if computed:
        print(f"written: {lists.path} ({what}; {lists.seconds:.1f} s)")
    else:
        print(f"up to date: {lists.path} ({what})")


# --- serve --------------------------------------------------------------------------------------


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="the web app: search and play tracks, similar songs, recommendations, uploads, the map",
        description=(
            "Serve a run directory over HTTP: one web page and a JSON API (schema at /docs). Binds "
            "to 127.0.0.1 unless --host says otherwise; uploads are size-limited and decoded in a "
            "worker process with a timeout."
        ),
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine)")
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000)")
    p.add_argument("--model", default="cnn-mse", help="model placing cold songs and uploads (cnn-mse)")
    p.add_argument("--upload-dir", type=Path, help="where uploads stay while placed (default: a temp dir)")
    p.add_argument("--max-upload-mb", type=float, help="largest upload in MB (default 50)")
    p.add_argument("--decode-timeout", type=float, help="longest decode of an upload in s (default 60)")
    p.add_argument("--workers", type=_positive_int, default=min(os.cpu_count() or 1, 8),
                   help="server processes sharing the loaded run (default: the number of cores)")
    p.add_argument("--upload-queue", type=_positive_int,
                   help="uploads placed or waiting per worker; more are asked to retry (default 4)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests for this Host name (e.g. a DNS name of this machine)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="URL",
                   help="let pages of this origin (scheme://host:port) upload")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.set_defaults(func=_run_serve)


def _serve(run_dir: Path, *, host: str, port: int, progress: bool, **options) -> None:
    from sonicrec.serve import serve

    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: other machines can reach this server", host)
    print(f"sonicrec web app of {run_dir}: http://{'[' + host + ']' if ':' in host else host}:{port}/ "
          "(Ctrl-C stops it)")
    serve(run_dir, host=host, port=port, show_progress=progress, **options)


def _run_serve(args: argparse.Namespace) -> None:
    limits = {"max_upload_mb": args.max_upload_mb, "decode_timeout_s": args.decode_timeout,
              "upload_queue": args.upload_queue}
    _serve(
        args.run_dir, host=args.host, port=args.port, progress=args.progress, model=args.model,
        upload_dir=args.upload_dir, workers=args.workers, access_log=args.access_log,
        allowed_hosts=args.allow_host, allowed_origins=args.allow_origin,
        **{k: v for k, v in limits.items() if v is not None},
    )


_COMMANDS = [
    _add_demo, _add_ingest, _add_factorize, _add_factors, _add_recommend, _add_audience, _add_similar,
    _add_baselines, _add_evaluate, _add_study, _add_learning_curve, _add_warmup, _add_train, _add_predict,
    _add_adapt,
    _add_export, _add_analyse, _add_neighbours, _add_serve,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sonicrec",
        description="Recommend music by how it sounds: audio -> CNN -> collaborative-filtering space.",
    )
    parser.add_argument("--version", action="version", version=f"sonicrec {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide progress bars"
    )
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_IntermixedParser
    )
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quiet:
        args.progress = False
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except SonicrecError as exc:
        print(f"sonicrec {args.command}: error: {error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sonicrec {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
