"""Every Triton kernel configuration the launchers can choose at the target shapes launches on H100 / H200 / B200:
compiled ahead of time for sm_90 and sm_100 (no GPU needed), shared memory within the per-block limit and no more
than a few bytes of register spills (see kernel_resources.py for what is compiled and how it is measured)."""

import dataclasses
import importlib.util
import json
import os
from types import SimpleNamespace

import pytest

from tests.ops.kernel_resources import ARCHS, SLSTM_TARGETS, over_limits, run_audit, variants

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
              pytest.mark.slow]
FAMILIES = ("slstm", "mlstm")


@pytest.fixture(scope="module")
def audit_rows() -> list[dict]:
    return run_audit(list(FAMILIES), jobs=min(4, os.cpu_count() or 1))


def test_every_choosable_configuration_is_compiled(audit_rows):
    """The audit compiled exactly the variants enumerated from the launchers (each once), for both archs."""
    expected = json.loads(json.dumps([dataclasses.asdict(v) for family in FAMILIES for v in variants(family, "ci")]))
    got = [r["variant"] for r in audit_rows]
    assert len(got) == len(expected) and all(v in got for v in expected)
    assert {r["variant"]["arch"] for r in audit_rows} == set(ARCHS)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("arch", ARCHS)
def test_configurations_launch_within_limits(audit_rows, family, arch):
    rows = [r for r in audit_rows if r["variant"]["family"] == family and r["variant"]["arch"] == arch]
    assert rows
    assert not over_limits(rows), "\n".join(over_limits(rows))


def test_audit_flags_what_exceeds_a_limit(audit_rows):
    """The check names exactly the compiled configurations above a limit (here, limits just below the largest
    measured shared memory and spills: the kernels' own worst cases must be reported)."""
    top_shared = max(r["shared"] for r in audit_rows)
    top_spill = max(r["spill_stores"] for r in audit_rows)
    flagged = over_limits(audit_rows, shared_limit=top_shared - 1, spill_limit=max(top_spill - 1, 0))
    expected = sum(r["shared"] == top_shared for r in audit_rows) + sum(
        r["spill_stores"] > max(top_spill - 1, 0) for r in audit_rows)
    assert len(flagged) == expected > 0
    assert all("B shared >" in line or "B spilled >" in line for line in flagged)


# the devices of each arch: (name, SMs); all have 64 K registers, 228 KiB shared memory and 2,048 threads per SM
DEVICES = {90: [("H100 / H200 SXM", 132)], 100: [("B200", 148)]}


@pytest.mark.parametrize("arch", ARCHS)
def test_slstm_sync_mode_is_resident_at_the_paper_heads(audit_rows, arch):
    """With the compiled registers and shared memory, the occupancy rule the launcher applies leaves >= 2 programs
    per (head, batch tile) for the grid-barrier mode at the target batch sizes, so `auto` picks it there (and a grid
    that does not fit falls back to a mode without a barrier)."""
    from xlstm_megatron.ops.slstm.triton import launch

    rows = [r for r in audit_rows if r["variant"]["family"] == "slstm" and r["variant"]["arch"] == arch
            and dict(map(tuple, r["variant"]["constexprs"]))["SYNC"]]
    assert rows
    for _, sms in DEVICES[arch]:
        props = SimpleNamespace(max_threads_per_multi_processor=2048, regs_per_multiprocessor=65536,
                                shared_memory_per_multiprocessor=233472, multi_processor_count=sms)
        for B, _, NH, DH in SLSTM_TARGETS:
            groups = NH * -(-B // launch.BATCH_TILE)
            for r in rows:
                cap = launch.resident_programs(props, r["shared"], r["regs"], launch.NUM_WARPS)
                assert min(-(-DH // launch.BLOCK_N), cap // groups) >= 2, (r["label"], cap)
