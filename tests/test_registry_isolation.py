"""What one test registers (a compressor, a policy, a plug-in module) is gone in the next.

``COMPRESSORS`` and ``POLICIES`` are plain dicts that decorators fill at import;
tests/conftest.py restores them around every test and every module. The first
two tests run in order: the first registers, the second must not see it.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import pytest

import adaquantfl.compression
import adaquantfl.policy
from adaquantfl.compression import COMPRESSORS, QSGDCompressor, register_compressor
from adaquantfl.policy import POLICIES, FixedLevels, LevelPolicy, register_policy
from tests.conftest import isolated_registries

PROBE = "isolation-probe"
#: Names of the tests that registered something, in the order they ran.
REGISTERED_IN: list[str] = []


class ProbeCompressor(QSGDCompressor):
    name = PROBE


def probe_policy(**_: Any) -> LevelPolicy:
    return FixedLevels(1)


def levelless() -> set[str]:
    """The set of methods that ignore ``levels``, beside POLICIES wherever it lives."""
    found = getattr(sys.modules[register_policy.__module__], "LEVELLESS", set())
    assert isinstance(found, set)
    return found


def test_a_registration_holds_for_the_rest_of_its_test() -> None:
    # The control of the next test: without a restore, all of this would stay.
    register_compressor(ProbeCompressor)
    register_policy(PROBE, takes_levels=False)(probe_policy)
    importlib.import_module("tests.plugins")

    assert COMPRESSORS[PROBE] is ProbeCompressor
    assert POLICIES[PROBE] is probe_policy and PROBE in levelless()
    assert "test-rounding" in COMPRESSORS and "test-per-client" in POLICIES
    REGISTERED_IN.append("test_a_registration_holds_for_the_rest_of_its_test")


def test_the_previous_tests_registrations_are_gone() -> None:
    if not REGISTERED_IN:
        pytest.skip("proves isolation only when run after the test above")
    assert PROBE not in COMPRESSORS and PROBE not in POLICIES and PROBE not in levelless()
    assert "test-rounding" not in COMPRESSORS and "test-per-client" not in POLICIES
    # The built-ins survived the restore.
    assert COMPRESSORS["qsgd"] is QSGDCompressor
    assert {"fp32", "qsgd", "adaquantfl"} <= set(POLICIES)
    # The plug-in module was forgotten, so importing it registers it again.
    assert "tests.plugins" not in sys.modules
    module = importlib.import_module("tests.plugins")
    assert COMPRESSORS["test-rounding"] is module.RoundingCompressor


def test_the_restore_is_in_place_and_undoes_replacements_and_removals() -> None:
    compressors, policies, methods = dict(COMPRESSORS), dict(POLICIES), set(levelless())

    with isolated_registries():
        register_compressor(ProbeCompressor)
        COMPRESSORS["qsgd"] = ProbeCompressor  # a built-in replaced
        del POLICIES["fp32"]  # and one removed
        register_policy(PROBE, takes_levels=False)(probe_policy)
        assert COMPRESSORS["qsgd"] is ProbeCompressor and "fp32" not in POLICIES

    assert dict(COMPRESSORS) == compressors and dict(POLICIES) == policies
    assert levelless() == methods
    # The same objects as before: modules that imported them see the restore.
    assert adaquantfl.compression.COMPRESSORS is COMPRESSORS
    assert adaquantfl.policy.POLICIES is POLICIES
