"""Library errors phrased for someone using the web app: no command, flag or function names.

The web app turns a :class:`~sonicrec.errors.SonicrecError` into a response whose ``detail`` is
:func:`error_detail`; the remedy, in the library's terms, becomes advice a browser user can take
(upload another file) or pass on (whoever runs the server must run a stage first).
"""

from __future__ import annotations

from sonicrec.errors import STAGES, ChooseOutput, Remedy, RunStage, SetOption, SonicrecError


def remedy_for_web(remedy: Remedy) -> str:
    """The remedy as advice to a web user."""
    if isinstance(remedy, RunStage):
        return f"this server's run is not ready: whoever runs the server must {STAGES[remedy.stage][0]} first"
    if isinstance(remedy, ChooseOutput):
        return "the server's run directory cannot be used: whoever runs the server must choose another"
    if isinstance(remedy, SetOption):
        return f"whoever runs the server must change its setting {remedy.key}"
    return "check the file, or upload another"


def error_detail(exc: SonicrecError) -> str:
    """The ``detail`` of the HTTP response that reports ``exc``."""
    if exc.remedy is None:
        return str(exc)
    return f"{exc.message}; {remedy_for_web(exc.remedy)}"
