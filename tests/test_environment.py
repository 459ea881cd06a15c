"""Every result row names the peers' library versions beside torch's: an installed package by its version, one that
is not installed as None (a row from a machine without the peer says so rather than leaving the key out)."""

from benchmarks import environment


def test_installed_packages_have_their_version_and_missing_ones_none(monkeypatch):
    import pytest

    monkeypatch.setattr(environment, "PEER_PACKAGES", ("pytest", "no-such-package-diffrt-test"))
    env = environment.environment("abc")
    assert env["pytest"] == pytest.__version__
    assert env["no-such-package-diffrt-test"] is None
    assert env["commit"] == "abc" and {"gpu", "torch", "triton", "driver", "date"} <= env.keys()
