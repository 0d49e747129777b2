"""Level schedules (DESIGN §7 import path); implemented in :mod:`adaquantfl.policy`.

from adaquantfl.schedule import FixedLevels, AdaQuantLevels
"""

from adaquantfl.policy import *  # noqa: F403
from adaquantfl.policy import __all__  # noqa: F401
