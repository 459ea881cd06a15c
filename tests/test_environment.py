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


def test_rows_name_their_call_one_per_process_unless_the_device_script_names_it(monkeypatch):
    monkeypatch.delenv("DIFFRT_CALL", raising=False)
    first, second = environment.environment("abc"), environment.environment("abc")
    assert first["call"] == second["call"] == environment.PROCESS_CALL
    monkeypatch.setenv("DIFFRT_CALL", "20261203T181000-4242")
    assert environment.environment("abc")["call"] == "20261203T181000-4242"
