"""The console's progress lines count on across a resume."""

from ray.tune.experiment import Trial

from tuning.search.callbacks import ProgressLines


def _trial(status: str, epoch: int) -> Trial:
    trial = Trial("run_trial", stub=True, config={})
    trial.set_status(status)
    trial.run_metadata.last_result = {"epoch": epoch, "val_acc": 0.5}
    return trial


def test_a_resumed_search_counts_on_from_the_trials_that_had_ended(capsys):
    ended = [_trial(Trial.TERMINATED, 3), _trial(Trial.ERROR, 1)]
    running, pending = _trial(Trial.RUNNING, 2), _trial(Trial.PENDING, 0)
    lines = ProgressLines(context=None, epochs=3, total=4)
    lines.on_step_begin(0, ended + [running, pending])
    running.run_metadata.last_result = {"epoch": 3, "val_acc": 0.5}
    lines.on_trial_complete(0, ended + [running, pending], running)
    assert "[3/4]" in capsys.readouterr().out


def test_a_fresh_search_counts_from_one(capsys):
    first = _trial(Trial.RUNNING, 3)
    lines = ProgressLines(context=None, epochs=3, total=2)
    lines.on_step_begin(0, [first, _trial(Trial.PENDING, 0)])
    lines.on_step_begin(1, [first])  # a later step does not count again
    lines.on_trial_complete(1, [first], first)
    assert "[1/2] " in capsys.readouterr().out
