"""Shared fixtures: one real local Ray for the tests that run searches in-process."""

import os
import signal

import pytest

# A local ray.init() turns token auth on; every cluster the tests start uses the same mode.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ctrl-C as a terminal gives it. Tests started in the background (`cmd &`, nohup, some CI
# runners) have SIGINT ignored, and every process they start would inherit that (an ignored
# signal stays ignored across exec): the commands under test would never see a Ctrl-C.
signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def ray_session():
    """A real Ray with 2 CPUs, started once per test session."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    yield ray
    ray.shutdown()
