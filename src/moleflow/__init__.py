"""moleflow: continual industrial anomaly detection with MoLE-Flow.

One model learns products one after another (no replay), routes every image to its product without
being told which it is, and returns an image score, a decision and a pixel anomaly map.
"""

__version__ = "0.1.0"

from .config import ABLATIONS, PRESETS, Config  # noqa: E402
from .detector import MoleFlow, Prediction, TaskInfo  # noqa: E402
from .errors import MoleflowError  # noqa: E402

__all__ = ["ABLATIONS", "PRESETS", "Config", "MoleFlow", "MoleflowError", "Prediction", "TaskInfo", "__version__"]
