"""The command line's own parsing: options anywhere among files, values checked before any work."""

import pytest

from sonicrec.cli import build_parser, main


def test_options_may_come_between_and_after_files():
    parser = build_parser()
    args = parser.parse_args(["predict", "RUN", "--name", "M", "a.ogg", "--out", "o.npz", "b.ogg", "c.ogg"])
    assert (args.name, args.out.name) == ("M", "o.npz")
    assert [p.name for p in args.audio] == ["a.ogg", "b.ogg", "c.ogg"]
    args = parser.parse_args(["ingest", "a.ogg", "--out", "RUN", "b/", "--workers", "2", "c.csv"])
    assert [p.name for p in args.paths] == ["a.ogg", "b", "c.csv"] and args.workers == 2
    args = parser.parse_args(["factors", "import", "RUN", "--songs", "s.npy"])  # a command of commands
    assert (args.action, args.songs.name) == ("import", "s.npy")
    args = parser.parse_args(["similar", "RUN", "--n", "3", "x.ogg", "--raw"])
    assert (args.song, args.n, args.raw) == ("x.ogg", 3, True)


@pytest.mark.parametrize("port", ["70000", "0", "-1", "65536"])
def test_serve_refuses_a_port_out_of_range(tmp_path, capsys, port):
    with pytest.raises(SystemExit) as exited:
        main(["serve", str(tmp_path), "--port", port])
    assert exited.value.code == 2 and "--port" in capsys.readouterr().err
    assert build_parser().parse_args(["serve", str(tmp_path), "--port", "65535"]).port == 65535
