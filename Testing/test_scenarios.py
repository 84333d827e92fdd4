"""The module's self-test scenarios (MRIHistoRegLib/scenarios.py) on slicer-core: the same functions Slicer's
MRIHistoRegTest runs on its own scene, here each on a fresh app-less scene and its own work folder."""
import pytest

import slicer_rules
from conftest import REPO
from MRIHistoRegLib import scenarios


def _panelParameterNode(scene):
    """What MRIHistoRegLogic().getParameterNode() gives in Slicer: the module's class under the wrapper's rules."""
    return slicer_rules.newParameterNode(scene, slicer_rules.loadParameterNodeClass(REPO / "MRIHistoReg" / "MRIHistoReg.py"))


EXTRA_ARGUMENTS = {"panelScenario": {"newParameterNode": _panelParameterNode}}  # what Slicer's self-test passes


@pytest.mark.parametrize("scenario", scenarios.SCENARIOS, ids=[s.__name__ for s in scenarios.SCENARIOS])
def test_scenario(scenario, scene, tmp_path):
    scenario(scene, tmp_path, **EXTRA_ARGUMENTS.get(scenario.__name__, {}))


def test_scenarios_stand_alone(tmp_path):
    """A scenario needs nothing from an earlier one: with no sample generated in this process it makes its own."""
    from MRIHistoRegLib.context import createScene

    saved = dict(scenarios._samples)
    scenarios._samples.clear()
    try:
        scenarios.fixSpacingScenario(createScene(), tmp_path)
        assert (tmp_path / "sample" / "truth.json").is_file()
    finally:
        scenarios._samples.clear()
        scenarios._samples.update(saved)
