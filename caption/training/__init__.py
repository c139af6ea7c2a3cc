"""Training: the loop, exact resume, the learning-rate schedules and data parallelism.

- `trainer`: `Trainer`, the loop in phases (setup, train epoch, validate, end epoch, save).
- `step`: the optimizer's parameter groups and one optimizer step across the ranks.
- `data`: a run's records, vocabulary, image or feature banks, and loader.
- `resume`: which checkpoint `resume=` names, restoring it, RNG states, stop signals.
- `schedules`: the learning-rate schedules of `conf/scheduler/`.
- `dist`: `Dist`, this process's place in a `torchrun` job and its collectives.

`caption-train` (`caption.cli.train`) builds the objects from a config and hands them to `Trainer`.
"""

from caption.training.dist import Dist
from caption.training.trainer import Trainer

__all__ = ["Dist", "Trainer"]
