import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from sonicrec import interactions
from sonicrec.errors import DataError
from sonicrec.interactions import PlayMatrix, read_play_matrix, split_songs, write_plays

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


def _count(matrix: PlayMatrix, user: str, song: str) -> int:
    u = int(np.flatnonzero(matrix.user_ids == user)[0])
    s = int(np.flatnonzero(matrix.song_ids == song)[0])
    return int(matrix.counts[u, s])


def test_triplets_sorted_ids_and_summed_duplicates(tmp_path):
    path = _write(tmp_path / "t.txt", "u2\tsB\t3\nu1\tsA\t1\nu2\tsA\t2\nu2\tsB\t4\n")
    m = read_play_matrix(path, "triplets", show_progress=False)
    assert list(m.user_ids) == ["u1", "u2"] and list(m.song_ids) == ["sA", "sB"]
    assert m.counts.toarray().tolist() == [[1, 0], [2, 7]]
    assert m.report.n_rows == 4 and m.report.n_malformed == 0


def test_malformed_rows_counted_with_line_numbers(tmp_path):
    text = "u1\ts1\t3\nu1\ts2\nu2\ts1\tx\nu2\ts2\t0\n\tsX\t1\nu3\ts3\t2\textra\nu4\ts4\t1.5\nu4\ts1\t2.0\n"
    path = _write(tmp_path / "bad.txt", text)
    m = read_play_matrix(path, "triplets", show_progress=False)
    assert m.report.n_rows == 8 and m.report.n_malformed == 6
    lines = [e.split(":")[0] for e in m.report.examples]
    assert lines == ["line 2", "line 3", "line 4", "line 5", "line 6"]  # first five, in file order
    assert "count is not a positive integer" in m.report.examples[1]
    assert "expected 3 fields" in m.report.examples[0]
    assert m.n_pairs == 2 and _count(m, "u4", "s1") == 2  # "2.0" is a valid integer count
    with pytest.raises(DataError, match=r"bad\.txt.*line 2"):
        read_play_matrix(path, "triplets", on_bad="error", show_progress=False)


def test_line_numbers_across_blocks(tmp_path, monkeypatch):
    rows = [f"u{i % 7}\ts{i % 11}\t{i % 5 + 1}" for i in range(300)]
    rows[150] = "u1\ts1\tnot-a-count"
    rows[251] = "u1\ts1"
    path = _write(tmp_path / "t.txt", "\n".join(rows))  # no final newline
    whole = read_play_matrix(path, "triplets", show_progress=False)
    monkeypatch.setattr(interactions, "BLOCK_BYTES", 64)  # many blocks, lines cut between reads
    blocks = read_play_matrix(path, "triplets", show_progress=False)
    assert (blocks.counts != whole.counts).nnz == 0
    assert [e.split(":")[0] for e in blocks.report.examples] == ["line 151", "line 252"]
    assert blocks.report.n_rows == 300


def test_gzip_triplets(tmp_path):
    path = tmp_path / "t.txt.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("u1\ts1\t2\nu2\ts1\t5\n")
    m = read_play_matrix(path, "triplets", show_progress=False)
    assert m.counts.sum() == 7


def test_lastfm1k_events_become_counts(tmp_path):
    text = (
        "user_000001\t2009-05-04T23:08:57Z\ta-mbid\tDeep Dish\tt-mbid\tFlashdance\n"
        "user_000001\t2009-05-04T23:12:57Z\ta-mbid\tDeep Dish\tt-mbid\tFlashdance\n"
        "user_000001\t2009-05-05T00:00:00Z\t\tSome Band\t\tNo Mbid Song\n"
        "user_000002\t2009-05-05T00:00:00Z\t\tSome Band\t\t\n"  # no track id nor name
        "user_000002\t2009-05-05T00:00:00Z\ttoo few fields\n"
    )
    m = read_play_matrix(_write(tmp_path / "1k.tsv", text), "lastfm1k", show_progress=False)
    assert set(m.song_ids) == {"t-mbid", "Some Band - No Mbid Song"}
    assert _count(m, "user_000001", "t-mbid") == 2
    assert m.report.n_malformed == 2
    assert [e.split(":")[0] for e in m.report.examples] == ["line 4", "line 5"]


def test_lastfm360k_artist_mbid_or_name(tmp_path):
    text = (
        "00000c28\t3bd73256-3905-4f3a-97e2-8b341527f805\tbetty blowtorch\t2137\n"
        "00000c28\t\tsome artist\t54\n"
        'user2\t3bd73256-3905-4f3a-97e2-8b341527f805\t"quoted" name\t7\n'
        "user2\t\tsome artist\t-3\n"
    )
    m = read_play_matrix(_write(tmp_path / "360k.tsv", text), "lastfm360k", show_progress=False)
    assert set(m.song_ids) == {"3bd73256-3905-4f3a-97e2-8b341527f805", "some artist"}
    assert _count(m, "user2", "3bd73256-3905-4f3a-97e2-8b341527f805") == 7
    assert m.report.n_malformed == 1 and m.report.examples[0].startswith("line 4")


@pytest.mark.parametrize("sep,newline", [(",", "\n"), ("\t", "\r\n")])
def test_csv_named_columns(tmp_path, sep, newline):
    rows = [["listener", "item", "plays", "other"], ["a", "x", "3", "q"], ["b", "x", "1", "q"],
            ["a", "y", "", "q"]]
    path = _write(tmp_path / "p.csv", newline.join(sep.join(r) for r in rows) + newline)
    m = read_play_matrix(
        path, "csv", user_col="listener", track_col="item", count_col="plays", show_progress=False
    )
    assert m.counts.toarray().tolist() == [[3], [1]]
    assert m.report.examples[0].startswith("line 4")  # header is line 1
    events = read_play_matrix(path, "csv", user_col="listener", track_col="item", count_col=None,
                              show_progress=False)
    assert _count(events, "a", "x") == 1 and _count(events, "a", "y") == 1
    with pytest.raises(DataError, match="no column.*user_id"):
        read_play_matrix(path, "csv", show_progress=False)


def test_parquet_round_trip_and_bad_rows(tmp_path):
    frame = pd.DataFrame({"user_id": ["u1", "u1", "u2"], "track_id": ["a", "b", "a"], "count": [1, 4, 2]})
    frame.to_parquet(tmp_path / "plays.parquet")
    m = read_play_matrix(tmp_path / "plays.parquet", "parquet", show_progress=False)
    back = m.to_frame()
    pd.testing.assert_frame_equal(
        back.sort_values(["user_id", "track_id"]).reset_index(drop=True), frame, check_dtype=False
    )
    assert (PlayMatrix.from_frame(back).counts != m.counts).nnz == 0
    frame.loc[1, "count"] = -1
    frame.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="row 2: count is not a positive integer"):
        read_play_matrix(tmp_path / "bad.parquet", "parquet", on_bad="error", show_progress=False)


def test_write_plays_is_what_the_reader_reads_with_its_metadata(tmp_path):
    frame = pd.DataFrame({"user_id": ["u2", "u1", "u1"], "track_id": ["a", "b", "a"], "count": [2, 4, 1]})
    path = tmp_path / "run" / "plays.parquet"
    write_plays(frame, path, metadata={b"simulated": b"true"})
    assert [p.name for p in path.parent.iterdir()] == ["plays.parquet"]  # written atomically
    table = pq.read_table(path)
    assert table.schema.metadata[b"simulated"] == b"true"
    pd.testing.assert_frame_equal(table.to_pandas(), frame)  # a frame keeps its row order
    m = read_play_matrix(path, "parquet", show_progress=False)
    assert (m.counts != PlayMatrix.from_frame(frame).counts).nnz == 0
    write_plays(m, path)
    assert (read_play_matrix(path, "parquet", show_progress=False).counts != m.counts).nnz == 0
    with pytest.raises(DataError, match="count must be an integer"):
        write_plays(frame.assign(count=[1, 0, 2]), tmp_path / "bad.parquet")
    assert not (tmp_path / "bad.parquet").exists()


def test_aligned_counts_follow_the_ids_given():
    m = PlayMatrix.from_frame(pd.DataFrame(
        {"user_id": ["u1", "u1", "u2", "u3"], "track_id": ["a", "b", "a", "c"], "count": [1, 4, 2, 5]}
    ))
    got = m.aligned(["u2", "u1", "nobody"], ["b", "a", "new"])
    np.testing.assert_array_equal(got.toarray(), [[0, 2, 0], [4, 1, 0], [0, 0, 0]])
    assert got.dtype == np.int64 and got.has_sorted_indices
    np.testing.assert_array_equal(m.played(["u1"]).toarray(), [[1, 1, 0]])  # songs a, b, c
    assert m.aligned().nnz == m.n_pairs and m.played().dtype == np.float32
    assert PlayMatrix.empty().aligned(["u1"], ["a"]).nnz == 0 and PlayMatrix.empty().n_pairs == 0


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="unknown play-count format"):
        read_play_matrix(tmp_path, "xml")
    with pytest.raises(DataError, match="no play-count file"):
        read_play_matrix(tmp_path / "none.txt", "triplets")


def test_split_songs_invariants():
    split = split_songs(1000, valid_fraction=0.1, test_fraction=0.2, seed=3)
    assert split.shape == (1000,)
    assert [(split == s).sum() for s in ("train", "valid", "test")] == [700, 100, 200]
    np.testing.assert_array_equal(split, split_songs(1000, valid_fraction=0.1, test_fraction=0.2, seed=3))
    assert (split != split_songs(1000, valid_fraction=0.1, test_fraction=0.2, seed=4)).any()


@pytest.mark.skipif(not (SHARED / "taste-profile-fragment").is_dir(), reason="shared data absent")
def test_real_taste_profile_fragment():
    m = read_play_matrix(SHARED / "taste-profile-fragment" / "train_triplets_fragment.txt", "triplets",
                         show_progress=False)
    assert (m.n_users, m.n_songs, m.n_pairs, m.report.n_malformed) == (1630, 9071, 42739, 0)
    assert m.counts.max() == 796 and np.median(m.counts.data) == 1


@pytest.mark.skipif(not (SHARED / "lastfm-hetrec2011").is_dir(), reason="shared data absent")
def test_real_lastfm_hetrec_crlf_tsv():
    m = read_play_matrix(SHARED / "lastfm-hetrec2011" / "user_artists.dat", "csv", user_col="userID",
                         track_col="artistID", count_col="weight", show_progress=False)
    assert (m.n_users, m.n_songs, m.n_pairs, m.report.n_malformed) == (1892, 17632, 92834, 0)
    assert round(m.counts.sum() / 1e6, 1) == 69.2


# --- hardening (issue 15) ------------------------------------------------------------------------


@pytest.mark.parametrize("count", ["1e30", "99999999999999999999", "9223372036854775807", "1000000001"])
def test_a_count_beyond_the_bound_is_an_error_naming_its_line(tmp_path, count):
    path = _write(tmp_path / "t.txt", f"u1\ts1\t2\nu1\ts2\t{count}\nu2\ts1\t3\n")
    for on_bad in ("skip", "error"):
        with pytest.raises(DataError, match=r"t\.txt: count\(s\) above 1,000,000,000 .*line 2"):
            read_play_matrix(path, "triplets", on_bad=on_bad, show_progress=False)
    ok = _write(tmp_path / "ok.txt", f"u1\ts1\t{interactions.MAX_COUNT}\n")
    assert _count(read_play_matrix(ok, "triplets", show_progress=False), "u1", "s1") == interactions.MAX_COUNT


def test_counts_whose_sum_overflows_are_an_error_naming_the_pair(tmp_path):
    half = interactions.MAX_COUNT // 2 + 1
    path = _write(tmp_path / "t.txt", f"u1\ts1\t1\nu2\ts1\t{half}\nu2\ts1\t{half}\n")
    with pytest.raises(DataError, match=r"user 'u2', song 's1' sum to 1,000,000,002"):
        read_play_matrix(path, "triplets", show_progress=False)
    frame = pd.DataFrame({"user_id": ["u", "u"], "track_id": ["s", "s"], "count": [half, half]})
    with pytest.raises(DataError, match="sum to"):
        PlayMatrix.from_frame(frame)


def test_a_uint64_parquet_count_above_int64_is_an_error_not_a_negative_count(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    counts = pa.array([2**63 + 5, 3], pa.uint64())
    pq.write_table(pa.table({"user_id": ["a", "b"], "track_id": ["x", "y"], "count": counts}), path)
    with pytest.raises(DataError, match=r"row 1: .*9223372036854775813"):
        read_play_matrix(path, "parquet", show_progress=False)


def test_invalid_utf8_ids_are_malformed_rows_with_their_line(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"u1\ts1\t2\nu\xff2\ts1\t3\nu3\ts\xc3\t1\nu4\ts2\t5\n")
    m = read_play_matrix(path, "triplets", show_progress=False)
    assert list(m.user_ids) == ["u1", "u4"] and m.report.n_malformed == 2 and m.report.n_rows == 4
    assert [e.split(":")[0] for e in m.report.examples] == ["line 2", "line 3"]
    assert "not valid UTF-8" in m.report.examples[0]
    with pytest.raises(DataError, match=r"line 2: not valid UTF-8"):
        read_play_matrix(path, "triplets", on_bad="error", show_progress=False)


def test_a_truncated_gzip_file_is_a_clear_error(tmp_path):
    rng = np.random.default_rng(0)
    text = "".join(f"u{rng.integers(10**9)}\ts{rng.integers(10**9)}\t3\n" for _ in range(5000))
    data = gzip.compress(text.encode())
    path = tmp_path / "t.txt.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"t\.txt\.gz: cannot read the file \(.*\): truncated or corrupt"):
        read_play_matrix(path, "triplets", show_progress=False)


def test_parquet_read_as_text_and_list_columns_are_clear_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"user_id": ["a"], "track_id": ["x"], "count": [1]}), path)
    with pytest.raises(DataError, match=r"is a Parquet file, not 'triplets' text: read it with format 'parq"):
        read_play_matrix(path, "triplets", show_progress=False)
    lists = tmp_path / "l.parquet"
    pq.write_table(pa.table({"user_id": [["a"], ["b"]], "track_id": ["x", "y"], "count": [1, 2]}), lists)
    with pytest.raises(DataError, match=r"column 'user_id' holds list<.*> values"):
        read_play_matrix(lists, "parquet", show_progress=False)


def test_csv_header_without_newline_and_cr_only_lines(tmp_path):
    one_row = _write(tmp_path / "a.csv", "user_id,track_id,count\nu,s,4")  # no final newline
    assert _count(read_play_matrix(one_row, "csv", show_progress=False), "u", "s") == 4
    header = _write(tmp_path / "h.csv", "user_id,track_id,count")
    with pytest.raises(DataError, match="no valid play counts"):
        read_play_matrix(header, "csv", show_progress=False)
    mac = _write(tmp_path / "m.csv", "user_id,track_id,count\ru,s,1\r")
    with pytest.raises(DataError, match="carriage return alone"):
        read_play_matrix(mac, "csv", show_progress=False)


def test_rows_pyarrow_cannot_hand_over_are_malformed_rows_not_a_crash(tmp_path):
    # a row with too few fields that is not UTF-8 (pyarrow's handler fails on it), a CR inside a line
    path = tmp_path / "t.txt"
    path.write_bytes(b"u1\ts1\t2\n\xb4\xff\xfe junk\nu2\ts\r2\t3\nu3\ts3\t4\r\nu4\ts1\t1\n")
    m = read_play_matrix(path, "triplets", show_progress=False)
    assert list(m.user_ids) == ["u1", "u3", "u4"] and m.report.n_malformed == 2 and m.report.n_rows == 5
    assert [e.split(":")[0] for e in m.report.examples] == ["line 2", "line 3"]
    mac = _write(tmp_path / "mac.txt", "u1\ts1\t2\ru2\ts1\t3\r")
    with pytest.raises(DataError, match="carriage return alone"):
        read_play_matrix(mac, "triplets", show_progress=False)
