"""A sampler's packages are the broker's to have: a study naming one that needs packages is
submitted from any machine, and the broker, where the sampler is built, fails the study with
the line that installs them when they are missing there.

The package's absence is made in this process (`sys.modules[name] = None`, which imports treat
as not installed), whatever this machine has installed; the broker is an in-process Daemon on
the real Redis."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
import redis

from optuna_rq.client import BrokerClient
from optuna_rq.daemon import BrokerSettings, Daemon
from optuna_rq.protocol import Sampler, Signer, StudySpec
from optuna_rq.study.algorithms import SAMPLER_PACKAGES, SamplerPackageError, make_sampler

pytestmark = pytest.mark.timeout(60)


def _spec(name: str, sampler: Sampler) -> StudySpec:
    return StudySpec(
        name=name,
        objective="tests.support.objectives:quadratic",
        space={"x": {"type": "float", "low": 0, "high": 1}},
        n_trials=2,
        concurrency=1,
        sampler=sampler,
    )


@pytest.fixture
def without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch is not installed, as far as this process can tell (scipy is, or is not: either
    way the GP sampler lacks a package)."""
    monkeypatch.setitem(sys.modules, "torch", None)


@pytest.fixture
def daemon(conn: redis.Redis, prefix: str) -> Iterator[Daemon]:
    broker = Daemon(conn, BrokerSettings(prefix=prefix, storage="memory"), Signer())
    broker.acquire()
    broker.registry.reattach()
    yield broker
    broker.dispatcher.stop_sampling()
    broker.release()


@pytest.mark.usefixtures("without_torch")
def test_a_sampler_without_its_packages_is_refused_where_it_is_built() -> None:
    with pytest.raises(SamplerPackageError, match="pip install .*torch") as refused:
        make_sampler(Sampler.GP, 0)
    assert str(refused.value).startswith("sampler gp needs ")
    assert "torch" in SAMPLER_PACKAGES[Sampler.GP]


@pytest.mark.usefixtures("without_torch")
def test_a_study_whose_sampler_lacks_its_packages_is_submitted_and_fails_on_the_broker(
    conn: redis.Redis, prefix: str, daemon: Daemon
) -> None:
    spec = _spec("gp", Sampler.GP)  # built on a machine without torch: nothing refuses it here
    client = BrokerClient(conn, prefix, signer=Signer())
    client.submit(spec)
    client.submit(_spec("tpe", Sampler.TPE))
    daemon.step()
    status = client.status("gp")
    assert status is not None and status.state.value == "failed"
    assert "sampler gp needs" in str(status.error)
    assert "pip install" in str(status.error) and "torch" in str(status.error)
    assert "tpe" in daemon.dispatcher.runs and "gp" not in daemon.dispatcher.runs
