"""The demo world, behind the ``demo`` extra (``pip install 'sonicrec[demo]'``): real scores of the
music21 corpus rendered to audio (:mod:`sonicrec.demo.render`), SIMULATED listeners
(:mod:`sonicrec.demo.listeners`), its size and seed (:mod:`sonicrec.demo.world`, RUN/demo.toml) and
every stage of sonicrec run on it (:mod:`sonicrec.demo.run`).

Nothing in the core imports this package; it uses the core like any caller. Importing it needs
none of the extra's packages: they are imported when a stage runs.
"""

from sonicrec.demo.run import DemoOptions, run_demo
from sonicrec.demo.world import DEMO_MODEL, MEDIUM_MODEL, SIZES, DemoConfig, world_preset

__all__ = ["DEMO_MODEL", "MEDIUM_MODEL", "SIZES", "DemoConfig", "DemoOptions", "run_demo", "world_preset"]
