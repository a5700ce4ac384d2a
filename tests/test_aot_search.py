"""`aot.largest_fitting`, the search behind `aot.search`, against brute force on memory curves like the compiler's.

Each compile costs seconds to minutes, so the search must find the exact boundary (the largest batch that fits, the
next one up not) in few compiles; a compile out of HBM gives no total (its message has temporaries alone).
"""

import pytest

from jaxkd import aot, config_base
from jaxkd.models import transformer
from tests.runs import load_config

LIMIT = 16.0
CURVES = {
    "linear": lambda k: 2.0 + 0.05 * k,
    "affine, steep": lambda k: 0.3 + 1.7 * k,
    "convex": lambda k: 1.0 + 0.01 * k + 0.0004 * k * k,
    "concave": lambda k: 16.5 * k / (k + 40),
    "kinked": lambda k: 0.5 + (0.01 * k if k < 50 else 0.5 + 0.06 * (k - 50)),
}


def _run(curve, start, cap, out_of_hbm_above=LIMIT * 1.1):
  calls = []

  def fits_at(k):
    calls.append(k)
    m = curve(k)
    if m > out_of_hbm_above:  # the compiler refuses: no total
      return False, 0.0
    return m <= LIMIT, m

  return aot.largest_fitting(fits_at, LIMIT, start=start, cap=cap), calls


@pytest.mark.parametrize("name", CURVES)
@pytest.mark.parametrize("start", (1, 3, 64, 700))
def test_the_search_finds_the_brute_force_answer(name, start):
  curve = CURVES[name]
  cap = 1024
  truth = max((k for k in range(1, cap + 1) if curve(k) <= LIMIT), default=0)
  found, calls = _run(curve, start, cap)
  assert found == truth, (found, truth, calls)
  assert len(calls) == len(set(calls)), calls  # no compile twice
  if found:  # the answer is shown to fit and the next step shown not to (or it is the bound)
    assert found in calls and (found == cap or found + 1 in calls), calls
  assert len(calls) <= 16, calls  # a bisection of [1, 1024] alone takes 10


def test_a_linear_curve_takes_few_compiles():
  """Two compiles give the line; its prediction and the row-step past it end the search."""
  found, calls = _run(CURVES["linear"], start=16, cap=1024)
  assert found == 280 and calls[:2] == [16, 32] and len(calls) <= 5, calls


def test_nothing_fits_and_the_bound():
  found, calls = _run(lambda k: 20.0 + k, start=8, cap=64)
  assert found == 0 and calls[-1] == 1, calls
  found, calls = _run(lambda k: 0.01 * k, start=8, cap=64)
  assert found == 64 and 65 not in calls, calls


def test_remat_choices_are_ordered_by_recomputation_and_checked():
  assert set(transformer.REMAT_BY_COST) == set(transformer.REMAT_POLICIES)
  c = load_config(**{"aot.remat_choices": "full,none, dots_no_batch_attention"})
  assert config_base.aot_remat_choices(c) == ["none", "dots_no_batch_attention", "full"]
  assert config_base.aot_remat_choices(load_config()) == [load_config().student.remat]
  with pytest.raises(config_base.ConfigError, match=r"config\.aot\.remat_choices=.*\['fast'\] unknown"):
    config_base.validate(load_config(**{"aot.topology": "v5e-4", "aot.remat_choices": "none,fast"}))
  with pytest.raises(config_base.ConfigError, match=r"config\.aot\.search=True: needs aot\.topology"):
    config_base.validate(load_config(**{"aot.search": True}))
