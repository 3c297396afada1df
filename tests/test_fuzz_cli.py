"""Property-based tests of the command line (issue 10, "keep it so"): whatever the damage to the tiny fixtures'
config.json, tokenizer files, safetensors header, imatrix files or GGUF metadata, and whatever odd arguments or
output paths are given, every subcommand

- exits with status 0 or 1, and with 1 prints exactly one ``Error:`` line and no traceback or warning;
- leaves no file behind but its completed output (and no temp file ever);
- leaves every file that existed before the run as it was.

The cases and checks are tests/fuzz_cases.py. Profiles: "ci" (the default; derandomized, about 250 examples in
all) and "many" (``HYPOTHESIS_PROFILE=many``, 500 per test, with shrinking). scripts/fuzz_cli.py runs many more
cases and real signals.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings

import fuzz_cases as F

settings.register_profile("ci", max_examples=12, derandomize=True, database=None, deadline=None,
                          phases=[Phase.explicit, Phase.generate], print_blob=False,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("many", max_examples=500, derandomize=False, database=None, deadline=None,
                          suppress_health_check=list(HealthCheck))
_PROFILE_NAME = os.environ.get("HYPOTHESIS_PROFILE", "ci")
PROFILE = settings.get_profile(_PROFILE_NAME if _PROFILE_NAME in ("ci", "many") else "ci")


@pytest.fixture(scope="module")
def im_model(tmp_path_factory) -> Path:
    """The synthetic model the imatrix fixtures belong to, written once."""
    return F.make_im_model(tmp_path_factory.mktemp("fuzz-cli") / "im-model.gguf")


def _check(case: F.Case, im_model: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="gguftool-fuzz-") as d:
        ws = F.make_workspace(Path(d), im_model)
        outcome = F.run_case(case, ws)
        found = F.problems(outcome)
        assert not found, "\n" + F.explain(case, ws, outcome)


def _make_test(key):
    @PROFILE
    @given(case=F.STRATEGIES[key])
    def test(im_model, case):
        _check(case, im_model)
    test.__name__ = "test_" + "_".join(k.replace("-", "_") for k in key)
    return test


for _key in F.STRATEGIES:
    _t = _make_test(_key)
    globals()[_t.__name__] = _t
del _t, _key
