"""Every Triton kernel configuration the launchers can choose at the target shapes launches on H100 / H200 / B200:
compiled ahead of time for sm_90 and sm_100 (no GPU needed), shared memory within the per-block limit and no more
than a few bytes of register spills (see kernel_resources.py for what is compiled and how it is measured)."""

import dataclasses
import importlib.util

import pytest

from tests.ops.kernel_resources import ARCHS, SHARED_LIMIT, over_limits, run_audit, variants

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
              pytest.mark.slow]
FAMILIES = ("slstm", "mlstm")


@pytest.fixture(scope="module")
def audit_rows() -> list[dict]:
    return run_audit(list(FAMILIES), jobs=2)


def test_every_choosable_configuration_is_compiled(audit_rows):
    """The audit compiled exactly the variants enumerated from the launchers (each once), for both archs."""
    expected = [dataclasses.asdict(v) for family in FAMILIES for v in variants(family, "ci")]
    got = [r["variant"] for r in audit_rows]
    assert len(got) == len(expected) and all(v in got for v in expected)
    assert {r["variant"]["arch"] for r in audit_rows} == set(ARCHS)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("arch", ARCHS)
def test_configurations_fit_the_gpu(audit_rows, family, arch):
    rows = [r for r in audit_rows if r["variant"]["family"] == family and r["variant"]["arch"] == arch]
    assert rows
    assert not over_limits(rows), "\n".join(over_limits(rows))


def test_audit_flags_a_configuration_over_the_limits():
    """The same pipeline rejects an sLSTM tiling whose shared memory cannot launch (R tiles of 128 x 128)."""
    rows = run_audit(["slstm"], jobs=1, slstm_config="BB=64,BK=128,BN=128")
    assert rows and all(r["shared"] > SHARED_LIMIT for r in rows)
    assert len(over_limits(rows)) >= len(rows)
    assert not over_limits(rows, shared_limit=max(r["shared"] for r in rows), spill_limit=1 << 30)
