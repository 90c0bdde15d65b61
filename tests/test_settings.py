"""A search's settings: typed and validated, written to and read from search.yaml, and old
search.yaml files still read (and resume) as the search they were."""

from pathlib import Path

import pytest
import yaml

from tuning.run.config import ConfigError, UserError
from tuning.search.settings import SearchSettings

OLD = Path(__file__).parent / "data" / "search-v1.yaml"


def test_an_old_search_yaml_reads_with_the_defaults_of_what_it_lacks():
    settings = SearchSettings.read(OLD)
    assert (settings.name, settings.epochs, settings.num_samples) == ("h", 15, 24)
    assert (settings.baseline, settings.choose, settings.budget_epochs, settings.sampler_seed,
            settings.first_rung) == ("default", "best", None, None, None)
    # Its space searched the teacher's depth, which a new space may not: it keeps it.
    assert "teacher_depth" in {p.name for p in settings.space().params}


def test_settings_round_trip_through_search_yaml(tmp_path):
    settings = SearchSettings.read(OLD)
    settings.storage_path = str(tmp_path)
    settings.first_rung, settings.baseline = 0.5, "none"
    settings.write(tmp_path / "h")
    again = SearchSettings.read(tmp_path / "h" / "search.yaml")
    assert again == settings and again.sampler_rng_seed == settings.seed


@pytest.mark.parametrize(("change", "expect"), [
    ({"epochs": 0}, "epochs must be at least 1"),
    ({"epochs": "ten"}, "epochs must be an integer"),
    ({"scheduler": "hyperband"}, "scheduler must be one of asha, fifo"),
    ({"name": "../x"}, "is not a valid search name"),
    ({"cpus_per_trial": -1}, "cpus_per_trial must be more than 0"),
    ({"first_rung": 2.0}, "first_rung must be a fraction"),
    ({"budget_epochs": 3}, "budget_epochs (3) is less than one trial (15 epochs)"),
    ({"choose": "knee"}, "choose knee picks from a Pareto front"),
    ({"overrides": [1, 2]}, "overrides must be a mapping"),
    ({"surprise": 1}, "unknown key 'surprise'"),
])
def test_a_damaged_search_yaml_is_one_line(tmp_path, change, expect):
    values = {k: v for k, v in yaml.safe_load(OLD.read_text()).items()}
    values.update(change)
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(UserError) as err:
        SearchSettings.read(path)
    assert expect in str(err.value) and "\n" not in str(err.value)


def test_missing_keys_and_non_mappings_are_refused(tmp_path):
    path = tmp_path / "search.yaml"
    for text, expect in (("", "not a mapping"), ("name: h\n", "it lacks cells"),
                         ("[1, 2]\n", "not a mapping"), ("name: [x\n", "is not valid YAML")):
        path.write_text(text)
        with pytest.raises(UserError, match=expect):
            SearchSettings.read(path)
    with pytest.raises(ConfigError):
        SearchSettings.from_dict({"name": "h"})


@pytest.mark.slow
def test_a_search_written_in_the_old_format_resumes(tmp_path):
    """A finished smoke search, its search.yaml rewritten as the project used to write it
    (without the settings added since), resumes through the real command."""
    import subprocess
    import sys

    from faultutil import REPO

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tuning.search", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600,
                              env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO),
                                   "RAY_AUTH_MODE": "disabled", "HOME": str(tmp_path)})

    first = run("--smoke", "--name", "old", "--set", "depth=18", "--num-samples", "1",
                "--replicates", "0", "--teacher-epochs", "1", "--epochs", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    path = tmp_path / "ray_results" / "old" / "search.yaml"
    values = yaml.safe_load(path.read_text())
    for key in ("baseline", "choose", "budget_epochs", "sampler_seed", "first_rung"):
        values.pop(key)
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    again = run("--resume", "--name", "old")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "per cell" in again.stdout
