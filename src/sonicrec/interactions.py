"""Play counts: readers for the common listening-data formats, the user x song matrix, song splits.

Formats (``fmt``):

* ``triplets``   -- Echo Nest Taste Profile ``train_triplets.txt``: ``user<TAB>song<TAB>count``, no header.
* ``lastfm1k``   -- Last.fm-1K ``userid-timestamp-artid-artname-traid-traname.tsv``: one row per play
  event, no header; the item is the track MBID, or ``"artist - track"`` where the MBID is empty.
* ``lastfm360k`` -- Last.fm-360K ``usersha1-artmbid-artname-plays.tsv``: ``user, artist MBID, artist
  name, plays``, no header; the item is the artist MBID, or the artist name where it is empty.
* ``csv``        -- a delimited file with a header line naming the user, item and count columns
  (delimiter sniffed from the header: tab if it has one, else comma). Without a count column every
  row is one play.
* ``parquet``    -- a Parquet table with the same named columns (RUN/plays.parquet is one).

Text files are read in blocks of whole lines, each parsed by pyarrow's CSV reader into Arrow
arrays (gzip/bz2 files are decompressed on the fly), so a 48M-row file never becomes 48M Python
objects. Ids are mapped to integers block by block; duplicate (user, item) rows are summed.
Malformed rows (wrong number of fields, an id that is not valid UTF-8, empty ids, a count that is
not a positive integer) are counted and reported with their line numbers, then skipped
(``on_bad="skip"``) or fatal (``on_bad="error"``). A count above :data:`MAX_COUNT` (or pairs whose
summed count is) is always an error naming the line (the pair): such a number is no listening
history but a wrong column or corrupt data, and clipping it would silently weigh it as the most
confident play of the file.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from scipy import sparse
from tqdm.auto import tqdm

from sonicrec.errors import ChooseOutput, DataError, OutputDirError, SetOption
from sonicrec.io import atomic_path

log = logging.getLogger(__name__)

FORMATS = ("triplets", "lastfm1k", "lastfm360k", "csv", "parquet")
BLOCK_BYTES = 32 << 20  # text read per parse: whole lines, about 32 MB
MAX_REPORTED = 5  # malformed rows quoted in a report or an error
MAX_COUNT = 10**9  # plays of one song by one user: 10^9 three-minute plays is 5,700 years
_PARQUET_MAGIC = b"PAR1"

# Headerless formats: their columns, the user column, how the item is built, the count column.
_LAYOUTS = {
    "triplets": ("user", "song", "count"),
    "lastfm1k": ("user", "timestamp", "artist_mbid", "artist_name", "track_mbid", "track_name"),
    "lastfm360k": ("user", "artist_mbid", "artist_name", "plays"),
}


@dataclass(frozen=True)
class ReadReport:
    """What a reader saw: rows read, malformed rows skipped and the first few of them."""

    path: str
    n_rows: int
    n_malformed: int
    examples: tuple[str, ...] = ()  # "line 12: <reason>: <text>" (Parquet: "row 12: ...")

    def __str__(self) -> str:
        text = f"{self.path}: {self.n_rows} rows, {self.n_malformed} malformed"
        if self.examples:
            more = " ..." if self.n_malformed > len(self.examples) else ""
            text += " (" + "; ".join(self.examples) + more + ")"
        return text


@dataclass(frozen=True)
class PlayMatrix:
    """Play counts as a sparse user x song matrix with sorted, unique string ids.

    Attributes
    ----------
    counts : (U, S) scipy.sparse.csr_matrix of int64, one stored value per (user, song) played
    user_ids : (U,) str, sorted
    song_ids : (S,) str, sorted
    report : the reader's report, when read from a file
    """

    counts: sparse.csr_matrix
    user_ids: np.ndarray
    song_ids: np.ndarray
    report: ReadReport | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.counts.shape != (len(self.user_ids), len(self.song_ids)):
            raise DataError(f"play matrix shape {self.counts.shape} does not match its ids")

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_songs(self) -> int:
        return len(self.song_ids)

    @property
    def n_pairs(self) -> int:
        """Number of (user, song) pairs with at least one play."""
        return self.counts.nnz

    def songs(self, columns: np.ndarray) -> sparse.csr_matrix:
        """(U, n) counts of the songs at ``columns`` (integer indices or a boolean mask)."""
        columns = np.flatnonzero(columns) if np.asarray(columns).dtype == bool else np.asarray(columns)
        return self.counts[:, columns].tocsr()

    def aligned(self, user_ids=None, song_ids=None) -> sparse.csr_matrix:
        """(len(user_ids), len(song_ids)) int64 counts, rows and columns in the order given (e.g.
        a factor model's; None: the matrix's own); ids without plays get empty rows or columns,
        the plays of other ids are left out."""
        user_ids = self.user_ids if user_ids is None else np.asarray(user_ids).astype(str)
        song_ids = self.song_ids if song_ids is None else np.asarray(song_ids).astype(str)
        rows = pd.Index(user_ids).get_indexer(self.user_ids)  # -1: left out
        cols = pd.Index(song_ids).get_indexer(self.song_ids)
        coo = self.counts.tocoo()
        keep = (rows[coo.row] >= 0) & (cols[coo.col] >= 0)
        matrix = sparse.csr_matrix(
            (coo.data[keep], (rows[coo.row[keep]], cols[coo.col[keep]])),
            shape=(len(user_ids), len(song_ids)), dtype=np.int64,
        )
        matrix.sort_indices()
        return matrix

    def played(self, user_ids=None, song_ids=None) -> sparse.csr_matrix:
        """:meth:`aligned` as float32 ones: which user played which song."""
        matrix = self.aligned(user_ids, song_ids).astype(np.float32)
        matrix.data[:] = 1.0
        return matrix

    @classmethod
    def empty(cls) -> PlayMatrix:
        """No plays (a run whose factors were imported without play counts)."""
        none = np.empty(0, dtype=str)
        return cls(sparse.csr_matrix((0, 0), dtype=np.int64), none, none)

    @classmethod
    def from_frame(cls, plays: pd.DataFrame) -> PlayMatrix:
        """From a frame with columns ``user_id``, ``track_id``, ``count`` (duplicate pairs are summed)."""
        missing = {"user_id", "track_id", "count"} - set(plays.columns)
        if missing:
            raise DataError(f"plays table lacks column(s) {sorted(missing)}: need user_id, track_id, count")
        counts = plays["count"].to_numpy()
        if len(counts) and (
            not np.issubdtype(counts.dtype, np.integer) or counts.min() <= 0 or counts.max() > MAX_COUNT
        ):
            raise DataError(f"plays table: count must be an integer from 1 to {MAX_COUNT:,} in every row")
        users = _IdCodes()
        songs = _IdCodes()
        rows = users.encode(pa.array(plays["user_id"].astype(str)))
        cols = songs.encode(pa.array(plays["track_id"].astype(str)))
        matrix = _assemble([rows], [cols], [counts.astype(np.int64)], users, songs, report=None)
        _check_sums(matrix, "plays table")
        return matrix

    def to_frame(self) -> pd.DataFrame:
        """Long form: one row per (user, song) pair, columns ``user_id``, ``track_id``, ``count``."""
        coo = self.counts.tocoo()
        table = pa.table(
            {
                "user_id": pa.DictionaryArray.from_arrays(coo.row.astype(np.int32), pa.array(self.user_ids)),
                "track_id": pa.DictionaryArray.from_arrays(coo.col.astype(np.int32), pa.array(self.song_ids)),
                "count": pa.array(coo.data.astype(np.int64)),
            }
        )
        schema = pa.schema([("user_id", pa.string()), ("track_id", pa.string()), ("count", pa.int64())])
        return table.cast(schema).to_pandas()


def read_play_matrix(
    path: str | Path,
    fmt: str = "triplets",
    *,
    user_col: str = "user_id",
    track_col: str = "track_id",
    count_col: str | None = "count",
    delimiter: str | None = None,
    on_bad: str = "skip",
    show_progress: bool = True,
) -> PlayMatrix:
    """Read play counts from a file into a :class:`PlayMatrix`.

    Parameters
    ----------
    path : the file (``.gz``/``.bz2`` text files are decompressed on the fly)
    fmt : one of :data:`FORMATS`
    user_col, track_col, count_col : column names for ``csv``/``parquet``; ``count_col=None``
        counts every row as one play
    delimiter : ``csv`` only; None sniffs it from the header line
    on_bad : ``"skip"`` (log a warning naming the first malformed lines) or ``"error"``
        (raise :class:`DataError` naming them)
    show_progress : show a progress bar over the file
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise DataError(f"unknown play-count format {fmt!r}: use one of {', '.join(FORMATS)}")
    if on_bad not in ("skip", "error"):
        raise DataError(f"on_bad={on_bad!r}: use 'skip' or 'error'")
    if not path.is_file():
        raise DataError(f"no play-count file at {path}")
    if fmt == "parquet":
        batches = _parquet_batches(path, user_col, track_col, count_col, show_progress)
    else:
        _refuse_parquet(path, fmt)
        batches = _text_batches(path, fmt, user_col, track_col, count_col, delimiter, show_progress)

    unit = "row" if fmt == "parquet" else "line"
    users, songs = _IdCodes(), _IdCodes()
    rows, cols, counts = [], [], []
    n_rows = n_bad = 0
    examples: list[str] = []
    for batch in _readable(batches, path):
        n_rows += batch.n_rows
        n_bad += batch.n_bad
        for number, reason, text in batch.examples[: MAX_REPORTED - len(examples)]:
            examples.append(f"{unit} {number}: {reason}: {text[:80]!r}")
        if batch.too_large:
            shown = "; ".join(f"{unit} {number}: {text[:80]!r}" for number, text in batch.too_large)
            raise DataError(f"{path}: count(s) above {MAX_COUNT:,} plays ({shown}): not play counts")
        if batch.n_bad and on_bad == "error":
            raise DataError(
                f"{path}: malformed row(s): " + "; ".join(examples) + " -- fix or remove them",
                remedy=SetOption("on_bad", "skip"),
            )
        rows.append(users.encode(batch.users))
        cols.append(songs.encode(batch.items))
        counts.append(batch.counts)
    report = ReadReport(str(path), n_rows, n_bad, tuple(examples))
    if n_bad:
        log.warning("skipped malformed rows: %s", report)
    matrix = _assemble(rows, cols, counts, users, songs, report=report)
    _check_sums(matrix, path)
    if matrix.n_pairs == 0:
        raise DataError(f"{path}: no valid play counts (format {fmt!r}; is that the right format?)")
    log.info(
        "%s: %d users x %d songs, %d (user, song) pairs, %d plays",
        path, matrix.n_users, matrix.n_songs, matrix.n_pairs, int(matrix.counts.sum()),
    )
    return matrix


#: Parquet key-value metadata of a plays file whose plays are SIMULATED (the demo world sets it).
SIMULATED_MARK = {b"simulated": b"true"}


def marked_simulated(path: str | Path) -> bool:
    """Whether the plays file ``path`` is marked simulated (:data:`SIMULATED_MARK`); False if absent."""
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        return False
    metadata = pq.read_schema(path).metadata or {}
    return all(metadata.get(key) == value for key, value in SIMULATED_MARK.items())


def write_plays(
    plays: PlayMatrix | pd.DataFrame, path: str | Path, *, metadata: Mapping[bytes, bytes] | None = None
) -> None:
    """Write play counts as the Parquet plays table RUN/plays.parquet, atomically.

    Columns ``user_id`` (str), ``track_id`` (str), ``count`` (int64), one row per (user, song) pair;
    ``metadata``: key-value pairs of the file (e.g. ``simulated=true``). A frame (columns as those)
    is checked as :meth:`PlayMatrix.from_frame` checks it and written in its row order.
    """
    import pyarrow.parquet as pq

    if isinstance(plays, PlayMatrix):
        frame = plays.to_frame()
    else:
        PlayMatrix.from_frame(plays)
        frame = plays[["user_id", "track_id", "count"]]
    schema = pa.schema([("user_id", pa.string()), ("track_id", pa.string()), ("count", pa.int64())])
    table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **(metadata or {})})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def import_plays_run(
    run: str | Path,
    source: str | Path,
    fmt: str = "triplets",
    *,
    replace: bool = False,
    user_col: str = "user_id",
    track_col: str = "track_id",
    count_col: str | None = "count",
    delimiter: str | None = None,
    on_bad: str = "skip",
    show_progress: bool = True,
) -> PlayMatrix:
    """Read the play-count file ``source`` (as :func:`read_play_matrix`) into RUN/plays.parquet.

    The run directory ``run`` is created if needed. One that already holds play counts is refused
    unless ``replace``: its factors, models and predictions then no longer match its plays.
    """
    from sonicrec.rundir import RunDir

    run = RunDir.prepare(run)
    if run.plays.is_file():
        if not replace:
            raise OutputDirError(
                f"{run.root} already holds play counts ({run.plays.name}) and what was made from them",
                remedy=ChooseOutput(or_replace=True),
            )
        log.warning("replacing the play counts of %s: its models and predictions no longer match", run.root)
    plays = read_play_matrix(
        source, fmt, user_col=user_col, track_col=track_col, count_col=count_col, delimiter=delimiter,
        on_bad=on_bad, show_progress=show_progress,
    )
    write_plays(plays, run.plays)
    return plays


def split_songs(
    n_songs: int, *, valid_fraction: float, test_fraction: float, seed: int
) -> np.ndarray:
    """Assign songs at random to "train", "valid" and "test" (cold-start evaluation).

    Returns
    -------
    (n_songs,) str array; ``round(n * fraction)`` songs in each held-out split, the rest train.
    """
    if not (0 <= valid_fraction and 0 <= test_fraction and valid_fraction + test_fraction < 1):
        raise DataError("valid_fraction + test_fraction must be in [0, 1)")
    order = np.random.default_rng(seed).permutation(n_songs)
    n_test = round(n_songs * test_fraction)
    n_valid = round(n_songs * valid_fraction)
    split = np.full(n_songs, "train", dtype="<U5")
    split[order[:n_test]] = "test"
    split[order[n_test : n_test + n_valid]] = "valid"
    return split


# --- reading ------------------------------------------------------------------------------------


def _readable(batches: Iterator[_Batch], path: Path) -> Iterator[_Batch]:
    """The batches, with an I/O or decoding failure of the file (a truncated .gz, a corrupt Parquet
    page) raised as a DataError naming it."""
    try:
        yield from batches
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: cannot read the file ({_reason(exc)}): truncated or corrupt?") from exc


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _refuse_parquet(path: Path, fmt: str) -> None:
    with open(path, "rb") as fh:
        if fh.read(len(_PARQUET_MAGIC)) == _PARQUET_MAGIC:
            raise DataError(f"{path} is a Parquet file, not {fmt!r} text: read it with format 'parquet'")


def _check_sums(matrix: PlayMatrix, source) -> None:
    """Raise naming the first (user, song) pair whose rows sum to more than MAX_COUNT plays."""
    over = np.flatnonzero(matrix.counts.data > MAX_COUNT)
    if len(over):
        coo = matrix.counts.tocoo()
        i = over[0]
        user, song = str(matrix.user_ids[coo.row[i]]), str(matrix.song_ids[coo.col[i]])
        raise DataError(
            f"{source}: the rows of user {user!r}, song {song!r} "
            f"sum to {int(coo.data[i]):,} plays, above {MAX_COUNT:,}: not play counts; fix them"
        )


@dataclass
class _Batch:
    users: pa.Array  # (n,) string
    items: pa.Array  # (n,) string
    counts: np.ndarray  # (n,) int64 > 0
    n_rows: int  # rows seen, valid or not
    n_bad: int  # malformed rows seen (and dropped)
    examples: list[tuple[int, str, str]]  # the first few: (line or row number, reason, text)
    too_large: list[tuple[int, str]] = field(default_factory=list)  # counts > MAX_COUNT: (line, text)


class _IdCodes:
    """Maps string ids to integer codes in order of first appearance, an Arrow batch at a time."""

    def __init__(self) -> None:
        self._index: dict[str, int] = {}

    def encode(self, ids: pa.Array) -> np.ndarray:
        encoded = pc.dictionary_encode(ids)
        index = self._index
        uniques = encoded.dictionary.to_pylist()
        codes = np.fromiter((index.setdefault(s, len(index)) for s in uniques), np.int32, len(uniques))
        return codes[encoded.indices.to_numpy(zero_copy_only=False)]  # (n,) int32

    def sorted_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids sorted, code -> position in the sorted ids)."""
        ids = np.array(list(self._index), dtype=str)
        order = np.argsort(ids, kind="stable")
        position = np.empty(len(ids), dtype=np.int64)
        position[order] = np.arange(len(ids))
        return ids[order], position


def _assemble(rows, cols, counts, users: _IdCodes, songs: _IdCodes, report) -> PlayMatrix:
    user_ids, user_pos = users.sorted_ids()
    song_ids, song_pos = songs.sorted_ids()
    row = user_pos[np.concatenate(rows)] if rows else np.zeros(0, np.int64)
    col = song_pos[np.concatenate(cols)] if cols else np.zeros(0, np.int64)
    data = np.concatenate(counts) if counts else np.zeros(0, np.int64)
    matrix = sparse.csr_matrix((data, (row, col)), shape=(len(user_ids), len(song_ids)), dtype=np.int64)
    matrix.sum_duplicates()
    return PlayMatrix(matrix, user_ids, song_ids, report)


def _text_batches(path, fmt, user_col, track_col, count_col, delimiter, show_progress) -> Iterator[_Batch]:
    quoted = fmt == "csv"
    with pa.input_stream(str(path), compression="detect") as stream, tqdm(
        total=path.stat().st_size if not _compressed(path) else None,
        unit="B", unit_scale=True, desc=f"read {path.name}", disable=not show_progress,
    ) as progress:
        first = stream.read(BLOCK_BYTES)
        line0 = 1  # number of the first line of the next block
        if fmt == "csv":
            header, first = _split_first_line(first, path)
            names, delimiter = _parse_header(header, delimiter, path)
            wanted = [c for c in (user_col, track_col, count_col) if c is not None]
            missing = [c for c in wanted if c not in names]
            if missing:
                raise DataError(
                    f"{path}: no column(s) {missing} in the header {names}",
                    remedy=SetOption("user_col/track_col/count_col"),
                )
            line0 = 2
            progress.update(len(header))
        else:
            names, delimiter = list(_LAYOUTS[fmt]), "\t"
            if b"\r" in first and b"\n" not in first:
                raise DataError(f"{path}: lines end in a carriage return alone (old Mac style): use LF")
        for block in _line_blocks(stream, first):
            table, invalid = _parse_block(block, names, delimiter, quoted)
            n_lines = block.count(b"\n") + (0 if block.endswith(b"\n") else 1)
            lines = np.delete(np.arange(line0, line0 + n_lines), [n - 1 for n, _ in invalid])
            wrong = [(line0 + n - 1, f"expected {len(names)} fields", t) for n, t in invalid[:MAX_REPORTED]]
            table, lines, n_not_utf8, not_utf8 = _decode_utf8(table, lines)
            line0 += n_lines
            progress.update(len(block))
            if fmt == "csv":
                batch = _rows_named(table, user_col, track_col, count_col, lines)
            else:
                batch = _ROWS[fmt](table, lines)
            batch.n_rows += len(invalid) + n_not_utf8
            batch.n_bad += len(invalid) + n_not_utf8
            batch.examples = sorted(wrong + not_utf8 + batch.examples)[:MAX_REPORTED]
            yield batch


def _parse_block(block: bytes, names: list[str], delimiter: str, quoted: bool) -> tuple[pa.Table, list]:
    """Whole lines -> (table of binary columns, [(line number in the block, text)] of the lines
    with a wrong number of fields).

    pyarrow also ends a line at a lone CR and cannot hand a malformed row that is not UTF-8 to its
    handler (it fails the whole block, printing the handler's exception): blocks with either are
    cut into lines here first, and a line with a CR inside is malformed.
    """
    if b"\r" not in block.replace(b"\r\n", b"") and _is_utf8(block):
        return _read_block(block, names, delimiter, quoted)
    pieces = block.split(b"\n")
    if pieces[-1] == b"":
        pieces.pop()
    kept, invalid = [], []
    for number, line in enumerate(pieces, start=1):
        body = line.removesuffix(b"\r")
        if body and (b"\r" in body or _field_count(body, delimiter, quoted) != len(names)):
            invalid.append((number, body.decode(errors="replace")))
        else:
            kept.append((number, line))
    table, more = _read_block(b"".join(line + b"\n" for _, line in kept), names, delimiter, quoted)
    return table, sorted(invalid + [(kept[n - 1][0], text) for n, text in more])


def _field_count(line: bytes, delimiter: str, quoted: bool) -> int:
    if quoted:
        return len(next(csv.reader([line.decode(errors="replace")], delimiter=delimiter)))
    return line.count(delimiter.encode()) + 1


def _read_block(block: bytes, names: list[str], delimiter: str, quoted: bool) -> tuple[pa.Table, list]:
    """pyarrow's parse of whole lines: (table of binary columns, [(line, text)] of malformed ones)."""
    import pyarrow.csv as pcsv

    if not block:
        return pa.table({name: pa.array([], pa.binary()) for name in names}), []
    invalid: list[tuple[int, str]] = []

    def on_invalid(row) -> str:
        invalid.append((row.number, row.text))
        return "skip"

    table = pcsv.read_csv(
        pa.py_buffer(block),
        read_options=pcsv.ReadOptions(column_names=names, use_threads=False, block_size=BLOCK_BYTES),
        parse_options=pcsv.ParseOptions(
            delimiter=delimiter, quote_char='"' if quoted else False,
            ignore_empty_lines=False, invalid_row_handler=on_invalid,
        ),
        convert_options=pcsv.ConvertOptions(column_types={n: pa.binary() for n in names}),
    )
    return table, invalid


def _decode_utf8(table: pa.Table, lines: np.ndarray) -> tuple[pa.Table, np.ndarray, int, list]:
    """Binary columns -> string columns, without the rows that are not valid UTF-8.

    Returns (table of the valid rows, their line numbers, number of invalid rows, the first few
    of them as (line, reason, text)).
    """
    try:
        return table.cast(pa.schema([(name, pa.string()) for name in table.column_names])), lines, 0, []
    except pa.ArrowInvalid:
        pass
    columns = [table.column(name).to_pylist() for name in table.column_names]
    bad = np.array([not all(map(_is_utf8, row)) for row in zip(*columns, strict=True)], dtype=bool)
    shown = [
        (int(lines[i]), "not valid UTF-8", b"\t".join(c[i] or b"" for c in columns).decode(errors="replace"))
        for i in np.flatnonzero(bad)[:MAX_REPORTED]
    ]
    table, lines, _, _ = _decode_utf8(table.filter(pa.array(~bad)), lines[~bad])
    return table, lines, int(bad.sum()), shown


def _is_utf8(value: bytes | None) -> bool:
    try:
        value is None or value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _compressed(path: Path) -> bool:
    return path.suffix.lower() in (".gz", ".bz2", ".zst", ".lz4")


def _line_blocks(stream, first: bytes) -> Iterator[bytes]:
    """Blocks of whole lines: cut at the last newline of each read, the rest carried over."""
    carry = first
    while True:
        chunk = stream.read(BLOCK_BYTES)
        if not chunk:
            if carry:
                yield carry
            return
        data = carry + chunk
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            carry = data
            continue
        yield data[:cut]
        carry = data[cut:]


def _split_first_line(data: bytes, path: Path) -> tuple[bytes, bytes]:
    """(header line, the rest) of the first block of a file."""
    cut = data.find(b"\n")
    if cut >= 0:
        return data[: cut + 1], data[cut + 1 :]
    if b"\r" in data:
        raise DataError(f"{path}: lines end in a carriage return alone (old Mac style): convert them to LF")
    if not data.strip():
        raise DataError(f"{path}: empty file: a csv play file needs a header line naming its columns")
    if len(data) >= BLOCK_BYTES:
        raise DataError(f"{path}: the header line is longer than {BLOCK_BYTES} bytes")
    return data, b""  # a header alone, without a newline


def _parse_header(line: bytes, delimiter: str | None, path: Path) -> tuple[list[str], str]:
    text = line.decode("utf-8-sig", errors="replace").rstrip("\r\n")
    if delimiter is None:
        delimiter = "\t" if "\t" in text else ","
    names = next(csv.reader([text], delimiter=delimiter))
    if len(set(names)) != len(names):
        raise DataError(f"{path}: duplicate column names in the header {names}")
    return names, delimiter


def _parquet_batches(path, user_col, track_col, count_col, show_progress) -> Iterator[_Batch]:
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc
    wanted = [c for c in (user_col, track_col, count_col) if c is not None]
    missing = [c for c in wanted if c not in file.schema_arrow.names]
    if missing:
        raise DataError(
            f"{path}: no column(s) {missing} among {file.schema_arrow.names}",
            remedy=SetOption("user_col/track_col/count_col"),
        )
    _check_parquet_types(file.schema_arrow, path, ids=(user_col, track_col), count=count_col)
    row0 = 1
    n_rows = file.metadata.num_rows
    with tqdm(total=n_rows, unit="row", desc=f"read {path.name}", disable=not show_progress) as bar:
        for record_batch in file.iter_batches(columns=wanted, batch_size=1 << 20):
            table = pa.Table.from_batches([record_batch])
            lines = np.arange(row0, row0 + table.num_rows)
            row0 += table.num_rows
            bar.update(table.num_rows)
            yield _rows_named(table, user_col, track_col, count_col, lines)


def _check_parquet_types(schema: pa.Schema, path: Path, *, ids: tuple[str, str], count: str | None) -> None:
    """Ids must be strings, binary or integers, counts numbers or strings (not lists, structs ...)."""
    def plain(t: pa.DataType) -> pa.DataType:
        return t.value_type if pa.types.is_dictionary(t) else t

    def scalar(t: pa.DataType) -> bool:
        return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)

    for name in ids:
        t = plain(schema.field(name).type)
        if not (scalar(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)):
            raise DataError(f"{path}: column {name!r} holds {t} values: ids must be strings or integers")
    if count is not None:
        t = plain(schema.field(count).type)
        if not (scalar(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)):
            raise DataError(f"{path}: column {count!r} holds {t} values: play counts must be integers")


# --- per-format row extraction: (table of string columns, line numbers) -> _Batch ---------------


def _as_string(column) -> pa.Array:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return pc.fill_null(pc.cast(array, pa.string()), "")


def _parse_counts(column) -> tuple[np.ndarray, np.ndarray]:
    """(n,) int64 counts (0 where bad; MAX_COUNT + 1 where above MAX_COUNT) and (n,) bool bad:
    not a positive integer."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    try:
        counts = pc.fill_null(pc.cast(array, pa.int64()), 0).to_numpy(zero_copy_only=False)
        return np.minimum(counts, MAX_COUNT + 1), counts <= 0
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # decimals, overflow, text
        values = pd.to_numeric(pd.Series(array.to_pylist(), dtype=object), errors="coerce").to_numpy(float)
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(values) & (values > 0) & (values == np.floor(values))
        return np.where(ok, np.minimum(values, MAX_COUNT + 1), 0).astype(np.int64), ~ok


def _finish(table, users, items, counts, bad_count, lines, fields_shown) -> _Batch:
    """Drop rows with an empty user/item or a bad count; describe them with their line numbers.

    Rows with a count above MAX_COUNT are listed in ``too_large`` (the reader raises on them).
    """
    empty_user = ~pc.not_equal(users, "").to_numpy(zero_copy_only=False)
    empty_item = ~pc.not_equal(items, "").to_numpy(zero_copy_only=False)
    bad = empty_user | empty_item | bad_count

    def text(i: int) -> str:
        return "\t".join(str(table.column(name)[i].as_py()) for name in fields_shown)

    examples = []
    for i in np.flatnonzero(bad)[:MAX_REPORTED]:
        reason = (
            "empty user id" if empty_user[i] else "empty item id" if empty_item[i]
            else "count is not a positive integer"
        )
        examples.append((int(lines[i]), reason, text(i)))
    too_large = [(int(lines[i]), text(i)) for i in np.flatnonzero(counts > MAX_COUNT)[:MAX_REPORTED]]
    keep = pa.array(~bad)
    return _Batch(
        users=users.filter(keep), items=items.filter(keep), counts=counts[~bad],
        n_rows=table.num_rows, n_bad=int(bad.sum()), examples=examples, too_large=too_large,
    )


def _rows_triplets(table: pa.Table, lines: np.ndarray) -> _Batch:
    counts, bad = _parse_counts(table.column("count"))
    return _finish(table, _as_string(table.column("user")), _as_string(table.column("song")), counts, bad,
                   lines, table.column_names)


def _rows_lastfm1k(table: pa.Table, lines: np.ndarray) -> _Batch:
    mbid = _as_string(table.column("track_mbid"))
    name = _as_string(table.column("track_name"))
    by_name = pc.binary_join_element_wise(_as_string(table.column("artist_name")), name, " - ")
    by_name = pc.if_else(pc.equal(name, ""), "", by_name)  # no track name and no MBID: no item
    items = pc.if_else(pc.equal(mbid, ""), by_name, mbid)
    counts = np.ones(table.num_rows, dtype=np.int64)
    return _finish(table, _as_string(table.column("user")), items, counts, np.zeros(table.num_rows, bool),
                   lines, table.column_names)


def _rows_lastfm360k(table: pa.Table, lines: np.ndarray) -> _Batch:
    mbid = _as_string(table.column("artist_mbid"))
    items = pc.if_else(pc.equal(mbid, ""), _as_string(table.column("artist_name")), mbid)
    counts, bad = _parse_counts(table.column("plays"))
    return _finish(table, _as_string(table.column("user")), items, counts, bad, lines, table.column_names)


def _rows_named(table: pa.Table, user_col, track_col, count_col, lines: np.ndarray) -> _Batch:
    if count_col is None:
        counts, bad = np.ones(table.num_rows, dtype=np.int64), np.zeros(table.num_rows, bool)
    else:
        counts, bad = _parse_counts(table.column(count_col))
    shown = [c for c in (user_col, track_col, count_col) if c is not None]
    users, items = _as_string(table.column(user_col)), _as_string(table.column(track_col))
    return _finish(table, users, items, counts, bad, lines, shown)


_ROWS = {"triplets": _rows_triplets, "lastfm1k": _rows_lastfm1k, "lastfm360k": _rows_lastfm360k}
