"""Library errors carry a remedy in their own terms; the CLI and the web app each phrase it
(issue 13 item 7, issue 15 item 16): no command-line flag or command reaches a web user."""

import io
import pickle
import re
import wave

import numpy as np
import pytest

from sonicrec.cli import error_line, main
from sonicrec.errors import (
    AudioError,
    CheckFile,
    ChooseOutput,
    DataError,
    MissingExtraError,
    OutputDirError,
    RunStage,
    SetOption,
    UnknownIdError,
)
from sonicrec.factors import Factors
from sonicrec.web_errors import error_detail

CLI_WORDS = re.compile(r"(^|\s|`|\()--[a-z]|sonicrec [a-z]|remove it|RUN/config")

ERRORS = [
    DataError("no factors at f.npz", remedy=RunStage("factorize")),
    DataError("no play counts at p", remedy=RunStage("plays")),
    DataError("empty store", remedy=RunStage("ingest")),
    DataError("no model checkpoint at c.pt", remedy=RunStage("train")),
    DataError("no predictions of model 'm'", remedy=RunStage("predict", model="m")),
    OutputDirError("d is not writable", remedy=ChooseOutput()),
    OutputDirError("d holds plays", remedy=ChooseOutput(or_replace=True)),
    MissingExtraError("Spark could not start", remedy=SetOption("cf.engine", "implicit")),
    DataError("bad rows", remedy=SetOption("on_bad", "skip")),
    DataError("no column", remedy=SetOption("user_col/track_col/count_col")),
    AudioError("a.wav: silent throughout", remedy=CheckFile()),
    UnknownIdError("unknown id 'x'", remedy=SetOption("audio.excerpt_offset")),
]


@pytest.mark.parametrize("exc", ERRORS, ids=lambda e: type(e.remedy).__name__)
def test_each_front_end_phrases_the_remedy_in_its_own_terms(exc):
    library, cli, web = str(exc), error_line(exc), error_detail(exc)
    assert all(text.startswith(exc.message + "; ") for text in (library, cli, web))
    assert not CLI_WORDS.search(library) and not CLI_WORDS.search(web), (library, web)
    assert len({library, cli, web}) == 3


def test_the_command_line_says_what_to_run():
    assert error_line(DataError("x", remedy=RunStage("factorize", run="r"))).endswith(
        "run `sonicrec factorize r` first")
    assert "sonicrec predict RUN --catalog --name m" in error_line(ERRORS[4])
    assert error_line(ERRORS[5]).endswith("choose another --out")
    assert error_line(ERRORS[6]).endswith("replace them with --force")


def test_errors_without_a_remedy_read_as_before_and_the_remedy_survives_pickling():
    assert str(DataError("plain")) == error_line(DataError("plain")) == error_detail(DataError("plain"))
    assert str(UnknownIdError("unknown id 'x'")) == "unknown id 'x'"
    copy = pickle.loads(pickle.dumps(ERRORS[0]))  # as from a worker process
    assert copy.remedy == RunStage("factorize") and str(copy) == str(ERRORS[0])


def test_a_missing_stage_on_the_command_line_names_the_command(tmp_path, capsys):
    with pytest.raises(DataError) as raised:
        Factors.load(tmp_path / "cf" / "factors.npz")
    assert "sonicrec factorize" not in str(raised.value)
    assert main(["-q", "train", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "run `sonicrec factorize RUN` first" in err and len(err.strip().splitlines()) == 1


def _silent_wav() -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(22050)
        w.writeframes(np.zeros(22050 * 3, np.int16).tobytes())
    return buffer.getvalue()


def test_a_web_response_holds_no_command_line_advice(tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from sonicrec.serve import create_app
    from test_serve import make_run, tiny_predictor

    run = make_run(tmp_path / "run", tiny_predictor())
    app = create_app(run.root, upload_dir=tmp_path / "uploads", predictor=tiny_predictor())
    with TestClient(app) as client:
        r = client.post("/api/upload", files={"file": ("quiet.wav", _silent_wav(), "audio/wav")})
    detail = r.json()["detail"]
    assert r.status_code == 422 and "silent throughout" in detail and "upload another" in detail
    assert not CLI_WORDS.search(detail), detail
