"""radioactive: mark an image dataset and detect, with an exact p-value, models trained on it.

Implements "Radioactive data: tracing through training" (Sablayrolles, Douze,
Schmid, Jegou, ICML 2020).
"""

__version__ = "0.1.0"
