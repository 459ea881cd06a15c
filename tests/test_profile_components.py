"""benchmarks/profile_components.py on the CPU (tiny preset): every component gets its table, the counted FLOPs of
the UNet step double with the CFG batch, and the weight-read floor is the weights' bytes over the bandwidth."""

import pytest

from benchmarks import profile_components


@pytest.fixture(scope="module")
def reports():
    args = ["--preset", "tiny-sd15", "--size", "64", "--calls", "1", "--top", "3"]
    return {g: profile_components.main([*args, "--guidance", str(g)]) for g in (0.0, 7.5)}


def test_each_component_has_its_table(reports):
    for name in ("text_encoder", "unet_step", "vae_decode"):
        r = reports[0.0][name]
        assert r["counted_gflop"] > 0 and r["weights_mb"] > 0, (name, r)
        assert {op["op"] for op in r["ops"]} & set(profile_components.COUNTED)
        assert r["weight_read_floor_ms"] == pytest.approx(r["weights_mb"] / (profile_components.HBM_TBPS * 1e3))


def test_unet_flops_double_under_cfg(reports):
    single, doubled = reports[0.0]["unet_step"]["counted_gflop"], reports[7.5]["unet_step"]["counted_gflop"]
    assert doubled == pytest.approx(2 * single, rel=0.01)
    assert reports[7.5]["vae_decode"]["counted_gflop"] == pytest.approx(reports[0.0]["vae_decode"]["counted_gflop"])


def test_each_component_names_its_environment(reports):
    for name in ("text_encoder", "unet_step", "vae_decode"):
        r = reports[0.0][name]
        assert {"gpu", "torch", "triton", "commit", "date", "preset", "size"} <= r.keys(), name
