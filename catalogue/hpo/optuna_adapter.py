"""Store Hyperband jobs as optuna trials, so any optuna storage holds the results.

Each job becomes one trial with the job's params fixed (``enqueue_trial`` then ``ask``) and
user attributes ``config_id`` and ``budget``. Many workers on many machines share one study
through an RDB URL, a ``JournalStorage(JournalFileBackend(path))`` on a shared file system,
or optuna's gRPC storage proxy; each worker runs ``ask`` / ``tell`` against its own
scheduler fed from the storage with ``cached_results`` (a restarted or extended run never
re-evaluates a stored pair).
"""

from __future__ import annotations

import math

from ..frame import require_extra

require_extra("hpo", "optuna")

import optuna  # noqa: E402

from .hyperband import IDHyperband, Job  # noqa: E402


class OptunaJobRecorder:
    """Wrap an :class:`IDHyperband` so that every job is also an optuna trial in ``study``.

    ``distributions`` maps each param name to its optuna distribution (used to store params).
    """

    def __init__(self, scheduler: IDHyperband, study: optuna.Study,
                 distributions: dict[str, optuna.distributions.BaseDistribution]):
        if len(study.directions) != 1 or study.direction != optuna.study.StudyDirection.MINIMIZE:
            raise ValueError("study: the Hyperband adapter needs a single-objective study that minimises")
        self.scheduler, self.study, self.distributions = scheduler, study, distributions
        self._trials: dict[tuple[int, float], optuna.trial.Trial] = {}

    def ask(self) -> tuple[Job, optuna.trial.Trial] | None:
        job = self.scheduler.ask()
        if job is None:
            return None
        self.study.enqueue_trial(job.params, user_attrs={"config_id": job.config_id, "budget": job.budget},
                                 skip_if_exists=False)
        trial = self.study.ask(self.distributions)
        self._trials[(job.config_id, job.budget)] = trial
        return job, trial

    def tell(self, job: Job, loss: float) -> None:
        self.scheduler.tell(job, loss)  # validates the job first
        trial = self._trials.pop((job.config_id, job.budget))
        value = float(loss)
        self.study.tell(trial, value if math.isfinite(value) else None,
                        state=None if math.isfinite(value) else optuna.trial.TrialState.FAIL)


def cached_results(study: optuna.Study) -> list[tuple[dict, float, float]]:
    """(params, budget, loss) of every COMPLETE trial the recorder stored in ``study``."""
    out = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if "budget" in trial.user_attrs:
            out.append((dict(trial.params), float(trial.user_attrs["budget"]), float(trial.value)))
    return out
