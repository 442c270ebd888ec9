"""Bring your own factors: song (and user) factors from another CF pipeline become a run's factors.

A streaming service already fits collaborative filtering in production; sonicrec can train its CNN
on those factors instead of its own WMF. Formats, chosen by the file name:

``.npy``
    an (n, k) matrix; row i belongs to line i of an id list (one id per line).
``.npz``
    the file ``implicit``'s models write with ``save()`` (``item_factors`` and ``user_factors``,
    rows numbered as the ids of the id list), or any ``.npz`` holding one 1-D id array and one
    2-D float array.
``.parquet`` (a file, or a folder of part files as Spark writes ``model.itemFactors``), ``.csv``
    an id column and either one list column (Spark ALS: ``id``, ``features``; in CSV a list is
    written ``[0.1, -0.2, ...]``) or one numeric column per dimension.

Integer ids of a table (Spark ALS's item and user columns are integers) are positions in the id
list when one is given, as a ``StringIndexer``'s labels are. Every table is checked: ids unique,
values finite, user and song factors of one dimension; errors name the file, row or id.

The cold-start split comes from a ``track_id,split`` file or is drawn (seeded by ``cf.seed``,
fractions ``cf.valid_fraction`` / ``cf.test_fraction``) among the imported songs that have features
in RUN/features (all imported songs when the run has no feature store); the others are "train".
The imported factors of test songs are their "true" factors, as WMF's folded-in ones are for a run
sonicrec factorised; but a production model was fitted with the test songs' plays, so user factors
saw them and the upper bound of the evaluation is a little optimistic (the CNN never sees them).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sonicrec.errors import DataError
from sonicrec.factors import SPLITS, Factors
from sonicrec.interactions import split_songs
from sonicrec.io import atomic_write_text
from sonicrec.rundir import RunDir

log = logging.getLogger(__name__)

ID_COLUMNS = ("id", "track_id", "song_id", "item_id", "user_id")
IMPLICIT_KEYS = {"songs": "item_factors", "users": "user_factors"}
_SHOWN = 5  # ids named in a report of unmatched ids


@dataclass(frozen=True)
class FactorTable:
    """Imported factors of one kind. ids : (n,) str, unique; vectors : (n, k) float32, finite."""

    ids: np.ndarray
    vectors: np.ndarray
    source: Path

    @property
    def n_factors(self) -> int:
        return self.vectors.shape[1]


def read_id_list(path: str | Path) -> np.ndarray:
    """Ids, one per line (blank lines at the end ignored): (n,) str."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the id list {path}: {exc}") from exc
    while lines and not lines[-1].strip():
        lines.pop()
    ids = np.array([line.strip() for line in lines], dtype=str)
    empty = np.flatnonzero(ids == "")
    if len(empty):
        raise DataError(f"{path}, line {empty[0] + 1}: empty id")
    return ids


def read_factor_table(
    path: str | Path, *, kind: str = "songs", ids: np.ndarray | None = None, id_col: str | None = None
) -> FactorTable:
    """Read and check the factors of one file (module docstring gives the formats).

    Parameters
    ----------
    kind : "songs" or "users": which half of an ``implicit`` model file to read
    ids : (n,) str id list: names the rows of ``.npy`` / ``implicit`` files and the integer ids
        of tables
    id_col : the id column of a table (default: the first of ``ID_COLUMNS`` present)
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"no factor file at {path}")
    suffix = "".join(path.suffixes[-1:]).lower()
    if suffix == ".npy":
        table_ids, vectors = None, _load_npy(path)
    elif suffix == ".npz":
        table_ids, vectors = _load_npz(path, kind)
    elif suffix in (".parquet", ".csv", ".tsv") or path.is_dir():
        table_ids, vectors = _load_table(path, id_col)
    else:
        raise DataError(f"{path}: unknown factor format {suffix!r}: use .npy, .npz, .parquet or .csv")
    table_ids = _resolve_ids(path, table_ids, ids, len(vectors))
    return _checked(FactorTable(table_ids, vectors, path))


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a numeric .npy matrix ({exc})") from exc


def _load_npz(path: Path, kind: str) -> tuple[np.ndarray | None, np.ndarray]:
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as data:
            names = list(data.files)
            if IMPLICIT_KEYS[kind] in names:  # implicit's model.save(): rows are numbered
                return None, data[IMPLICIT_KEYS[kind]]
            arrays = {}
            for name in names:
                try:
                    arrays[name] = data[name]
                except ValueError:  # a pickled object (e.g. implicit's RandomState): not ours
                    continue
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz ({exc})") from exc
    id_arrays = [n for n, a in arrays.items() if a.ndim == 1 and a.dtype.kind in "UOSiu"]
    matrices = [n for n, a in arrays.items() if a.ndim == 2 and a.dtype.kind == "f"]
    if len(matrices) != 1 or len(id_arrays) > 1:
        raise DataError(
            f"{path}: expected implicit's {IMPLICIT_KEYS[kind]!r}, or one 2-D float array and at most one "
            f"1-D id array; found {names}"
        )
    return (arrays[id_arrays[0]] if id_arrays else None), arrays[matrices[0]]


def _load_table(path: Path, id_col: str | None) -> tuple[np.ndarray, np.ndarray]:
    try:
        if path.is_dir() or path.suffix.lower() == ".parquet":
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_csv(path, sep=None, engine="python")
    except Exception as exc:  # pyarrow and pandas raise many kinds for a malformed file
        raise DataError(f"{path}: not a readable table ({type(exc).__name__}: {exc})") from exc
    if id_col is None:
        id_col = next((c for c in ID_COLUMNS if c in frame.columns), None)
    if id_col not in frame.columns:
        raise DataError(
            f"{path}: no id column (looked for {id_col or ID_COLUMNS}); columns: {list(frame.columns)}"
        )
    ids = frame[id_col].to_numpy()
    others = frame.drop(columns=[id_col])
    lists = [c for c in others.columns if not pd.api.types.is_numeric_dtype(others[c])]
    if len(lists) == 1 and others.shape[1] == 1:
        return ids, _stack_lists(path, others[lists[0]], ids)
    if lists:
        raise DataError(f"{path}: columns {lists} are neither numbers nor the single list column")
    if others.shape[1] == 0:
        raise DataError(f"{path}: no factor columns besides the id column {id_col!r}")
    return ids, others.to_numpy(dtype=np.float64)


def _stack_lists(path: Path, column: pd.Series, ids: np.ndarray) -> np.ndarray:
    """One vector per row of a list column (arrays in Parquet, ``[a, b, ...]`` text in CSV)."""
    rows = []
    for row, value in enumerate(column.tolist()):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = None
        try:
            vector = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            vector = np.empty(0)
        if vector.ndim != 1 or (rows and len(vector) != len(rows[0])) or len(vector) == 0:
            expected = f"a list of {len(rows[0])} numbers" if rows else "a list of numbers"
            raise DataError(
                f"{path}, row {row + 1} (id {str(ids[row])!r}): expected {expected} in {column.name!r}"
            )
        rows.append(vector)
    if not rows:
        raise DataError(f"{path}: no rows")
    return np.stack(rows)


def _resolve_ids(path: Path, table_ids: np.ndarray | None, id_list: np.ndarray | None, n: int) -> np.ndarray:
    """String ids of the rows: the table's own, or the id list by row / by integer id."""
    if table_ids is None:
        if id_list is None:
            raise DataError(f"{path} numbers its rows: give the id list (one id per line) with it")
        if len(id_list) != n:
            raise DataError(f"{path} has {n} rows but its id list has {len(id_list)} ids")
        return id_list
    table_ids = np.asarray(table_ids)
    if id_list is None or table_ids.dtype.kind not in "iu":
        return table_ids.astype(str)
    bad = np.flatnonzero((table_ids < 0) | (table_ids >= len(id_list)))
    if len(bad):
        raise DataError(
            f"{path}, row {bad[0] + 1}: id {int(table_ids[bad[0]])} is not a position in the id list "
            f"({len(id_list)} ids)"
        )
    return id_list[table_ids]


def _checked(table: FactorTable) -> FactorTable:
    path, ids = table.source, np.asarray(table.ids).astype(str)
    try:
        vectors = np.asarray(table.vectors, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: factors are not numbers ({exc})") from exc
    if vectors.ndim != 2 or vectors.shape[0] == 0 or vectors.shape[1] == 0:
        raise DataError(f"{path}: expected an (n, k) matrix of factors, got shape {vectors.shape}")
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if len(bad):
        raise DataError(f"{path}, row {bad[0] + 1} (id {str(ids[bad[0]])!r}): NaN or infinite factor "
                        f"({len(bad)} such rows)")
    unique, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = unique[counts > 1][0]
        rows = np.flatnonzero(ids == dup)[:2] + 1
        raise DataError(f"{path}: id {str(dup)!r} appears more than once (rows {rows[0]} and {rows[1]})")
    empty = np.flatnonzero(ids == "")
    if len(empty):
        raise DataError(f"{path}, row {empty[0] + 1}: empty id")
    return FactorTable(ids, vectors.astype(np.float32), path)


# --- the split --------------------------------------------------------------------------------------


def read_split(path: str | Path, song_ids: np.ndarray) -> np.ndarray:
    """(S,) split of ``song_ids`` from a CSV ``track_id,split`` file; songs it omits are "train"."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, sep=None, engine="python", dtype=str)
    except Exception as exc:  # pandas raises many kinds for a malformed file
        raise DataError(f"cannot read the split file {path}: {exc}") from exc
    id_col = next((c for c in ID_COLUMNS if c in frame.columns), None)
    if id_col is None or "split" not in frame.columns:
        raise DataError(f"{path}: expected columns track_id,split; found {list(frame.columns)}")
    bad = np.flatnonzero(~frame["split"].isin(SPLITS).to_numpy())
    if len(bad):
        value = frame["split"].iloc[bad[0]]
        raise DataError(f"{path}, row {bad[0] + 2}: split {value!r} is not one of {SPLITS}")
    position = pd.Index(song_ids).get_indexer(frame[id_col])
    unknown = np.flatnonzero(position < 0)
    if len(unknown):
        raise DataError(f"{path}, row {unknown[0] + 2}: song {frame[id_col].iloc[unknown[0]]!r} has no "
                        "imported factors")
    if frame[id_col].duplicated().any():
        raise DataError(f"{path}: song {frame[id_col][frame[id_col].duplicated()].iloc[0]!r} is listed twice")
    split = np.full(len(song_ids), "train", dtype="<U5")
    split[position] = frame["split"].to_numpy(dtype=str)
    return split


def draw_split(song_ids: np.ndarray, eligible: np.ndarray, *, valid_fraction: float, test_fraction: float,
               seed: int) -> np.ndarray:
    """(S,) seeded split drawn among the ``eligible`` (S,) bool songs; the others are "train"."""
    split = np.full(len(song_ids), "train", dtype="<U5")
    split[eligible] = split_songs(
        int(eligible.sum()), valid_fraction=valid_fraction, test_fraction=test_fraction, seed=seed
    )
    return split


# --- on a run directory -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportReport:
    """What an import wrote: counts, and the imported songs the feature store lacks (and vice versa)."""

    n_songs: int
    n_users: int
    n_factors: int
    split_counts: dict[str, int]
    split_source: str
    n_with_features: int | None  # None: the run has no feature store
    without_features: list[str]  # imported songs without features (the first few)
    n_features_without_factors: int | None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"


def import_factors_run(
    run: RunDir | str | Path,
    songs: str | Path | FactorTable,
    *,
    users: str | Path | FactorTable | None = None,
    song_ids: str | Path | None = None,
    user_ids: str | Path | None = None,
    id_col: str | None = None,
    split_path: str | Path | None = None,
) -> ImportReport:
    """Write imported factors as RUN/cf/factors.npz (and RUN/cf/import.json, the report).

    Parameters
    ----------
    songs, users : factor files (module docstring) or tables already read
    song_ids, user_ids : id lists naming the rows / integer ids of ``songs`` and ``users``
    id_col : the id column of Parquet/CSV tables
    split_path : a ``track_id,split`` CSV; None draws the split (module docstring)

    The run's config gets ``cf.factors`` = the imported dimension, so ``train`` builds a network of
    the right width. Songs are matched against RUN/features.
    """
    from sonicrec.features import FeatureStore

    if user_ids is not None and users is None:
        raise DataError(f"the user id list {user_ids} names the rows of a user factor file: give that too")
    songs = _as_table(songs, "songs", song_ids, id_col)
    users = None if users is None else _as_table(users, "users", user_ids, id_col)
    run = RunDir.prepare(run.root if isinstance(run, RunDir) else run)
    if users is not None and users.n_factors != songs.n_factors:
        raise DataError(f"{songs.source} has {songs.n_factors} factors per song but {users.source} has "
                        f"{users.n_factors} per user: they must come from one model")
    store_ids = set(FeatureStore(run.features).track_ids) if (run.features / "store.json").is_file() else None
    has_features = np.ones(len(songs.ids), dtype=bool) if store_ids is None else np.isin(
        songs.ids, np.array(sorted(store_ids), dtype=str))
    cfg = run.read_config()
    if split_path is not None:
        split, split_source = read_split(split_path, songs.ids), str(split_path)
    else:
        split = draw_split(songs.ids, has_features, valid_fraction=cfg.cf.valid_fraction,
                           test_fraction=cfg.cf.test_fraction, seed=cfg.cf.seed)
        split_source = f"drawn (seed {cfg.cf.seed}) among the imported songs with features"
    empty_users = np.zeros((0, songs.n_factors), dtype=np.float32)
    factors = Factors(
        users.ids if users is not None else np.array([], dtype=str),
        songs.ids, users.vectors if users is not None else empty_users, songs.vectors, split,
    )
    report = ImportReport(
        n_songs=len(songs.ids), n_users=len(factors.user_ids), n_factors=songs.n_factors,
        split_counts={s: int((split == s).sum()) for s in SPLITS}, split_source=split_source,
        n_with_features=None if store_ids is None else int(has_features.sum()),
        without_features=songs.ids[~has_features][:_SHOWN].tolist(),
        n_features_without_factors=None if store_ids is None else len(store_ids - set(songs.ids.tolist())),
    )
    _log_matches(report, run)
    cfg = cfg.replace(cf=dataclasses.replace(cfg.cf, factors=songs.n_factors))
    factors.save(run.factors)
    cfg.save(run.config)
    atomic_write_text(run.factors.with_name("import.json"), report.to_json())
    return report


def _as_table(source, kind: str, ids_path, id_col) -> FactorTable:
    if isinstance(source, FactorTable):
        return source
    ids = None if ids_path is None else read_id_list(ids_path)
    return read_factor_table(source, kind=kind, ids=ids, id_col=id_col)


def _log_matches(report: ImportReport, run: RunDir) -> None:
    if report.n_with_features is None:
        log.warning("%s has no feature store: run `sonicrec ingest` before training", run.root)
        return
    missing = report.n_songs - report.n_with_features
    if missing:
        log.warning("%d of %d imported songs have no features in %s and cannot be trained on (e.g. %s)",
                    missing, report.n_songs, run.features, ", ".join(report.without_features))
    if report.n_features_without_factors:
        log.info("%d songs of the feature store have no imported factors (the CNN will place them)",
                 report.n_features_without_factors)
