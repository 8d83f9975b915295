"""Evaluation: the reward-model benchmark (``rm_benchmark``), SR quality (``sr_quality``), the
reward-hacking experiment (``hacking``) and the HTML report (``report``).

The metric math they share lives in the leaf :mod:`finpercep.metrics`. The names this package
exported before that move stay importable from here (``from finpercep.eval import pixel_auroc``).
"""

from finpercep.metrics import (  # noqa: F401  (the package's public names before the move)
    DEFAULT_IOU_THRESHOLD,
    average_precision,
    drop_fraction,
    iou_at,
    map_mae,
    order_accuracy,
    pixel_auroc,
)
