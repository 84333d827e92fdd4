"""Issue 15, "never a traceback": every failure inside the refinement becomes a rejected refinement with its reason
and the landmark-only mapping is kept; geometries the phantom never had (a coarsened refinement field, a stack
coarser than the working spacing) run instead of raising.

Failures are real where ITK can be made to fail (a constant stack, a field lattice coarser than the MRI grid); a
mapping that raises stands in for an exception from anywhere else in the chain."""
import numpy as np
import pytest

from MRIHistoRegLib import downsample, refine, workflow
from MRIHistoRegLib.errors import UserInputError
from MRIHistoRegLib.mapping import AffineMapping, Mapping
from MRIHistoRegLib.stacks.array import ArraySource
from test_refine import FAST, _geometry, _phantom, _warp

AFFINE_ONLY = dict(FAST, bspline=False, histologyBiasCorrection=False)


def _probes(shape, ijkToRas):
    return refine._gridPoints(shape, ijkToRas)[::97]


def test_a_constant_stack_is_a_rejected_refinement_not_an_itk_exception():
    fixed, m = _phantom(), _geometry()
    constant = np.full(fixed.shape, 100.0, np.float32)  # footprint = everything, but no information for MI
    identity = AffineMapping(np.eye(4))
    result = refine.refineRegistration(fixed, m, constant, m, identity, settings=AFFINE_ONLY)
    assert not result.accepted and result.reason
    probes = _probes(fixed.shape, m)
    assert np.array_equal(result.transformPoints(probes), probes)  # the landmark-only mapping


def test_a_refinement_field_coarser_than_the_mri_grid_is_evaluated():
    """An MRI with more voxels than maxFieldPoints gets its refinement field on a coarser lattice; evaluating the
    metric through it raised ITK's "Virtual domain and moving transform displacement field must have the same
    size" (a 50 um MRI, 230 x 264 x 160). The small cap reproduces that geometry on the phantom."""
    fixed, m = _phantom(), _geometry()
    shift = np.array([0.12, -0.05, 0.0])
    moving = _warp(fixed, m, lambda y: y + shift, order=3)
    result = refine.refineRegistration(fixed, m, moving, m, AffineMapping(np.eye(4)),
                                       settings=dict(AFFINE_ONLY, maxFieldPoints=4000))
    assert result.displacement.shape[:3] != fixed.shape  # the coarsened lattice really was used
    assert np.isfinite(result.metricAfter) and result.metricAfter < result.metricBefore, result.reason
    assert result.accepted, result.reason


class _ExplodingMapping(Mapping):
    """A landmark mapping that fails the way a broken dependency would, wherever the refinement calls it."""

    def __init__(self, error):
        self.error = error

    def transformPoints(self, points):
        raise self.error


class _Fit:
    def __init__(self, model):
        self.model, self.pairs = model, None


@pytest.mark.parametrize("error", [RuntimeError("ITK ERROR: injected failure"), FloatingPointError("overflow"),
                                   MemoryError("no room"), ValueError("an internal bug")])
def test_any_failure_keeps_the_landmark_mapping_with_its_reason(error):
    fixed, m = _phantom(), _geometry()
    fit = _Fit(_ExplodingMapping(error))
    refinement = workflow.refine(workflow.Image(fixed, m), workflow.Image(fixed, m), fit, settings=AFFINE_ONLY)
    assert not refinement.accepted
    assert refinement.mapping is fit.model
    assert str(error) in refinement.reason
    assert refinement.summary["accepted"] is False and str(error) in refinement.summary["reason"]


def test_invalid_settings_are_still_the_users_to_fix():
    fixed, m = _phantom(), _geometry()
    with pytest.raises(UserInputError, match="valid names"):
        workflow.refine(workflow.Image(fixed, m), workflow.Image(fixed, m), _Fit(AffineMapping(np.eye(4))),
                        settings={"controlPointSpacing": 1})


def test_a_stack_coarser_than_the_working_spacing_along_one_axis_is_refined():
    """80 x 80 x 120 um with a 0.1 mm working spacing: area-averaged along i and j, kept at 0.12 mm along k."""
    fixed, m = _phantom(shape=(40, 48, 44)), _geometry(0.1)
    stackMatrix = np.diag([-0.08, -0.08, 0.12, 1.0])
    stackMatrix[:3, 3] = m[:3, 3]
    shape = (34, 60, 55)  # about the phantom's extent
    stack = _warp(fixed, m, lambda y: y + np.array([0.05, 0.0, 0.0]), shape=shape, ijkToRasOut=stackMatrix, order=3)
    source = ArraySource(stack, stackMatrix)
    with pytest.raises(UserInputError) as refused:
        downsample.downsampleStack(source, [0.1, 0.1, 0.1])
    assert "np.float64" not in str(refused.value) and "(0.1, 0.1, 0.1)" in str(refused.value)

    working = workflow._workingHistology(source, 0.1, None)
    spacing = np.linalg.norm(working.ijkToRas[:3, :3], axis=0)
    assert np.allclose(spacing, [0.1, 0.1, 0.12], atol=1e-9)
    refinement = workflow.refine(workflow.Image(fixed, m), source, _Fit(AffineMapping(np.eye(4))),
                                 settings=AFFINE_ONLY, workingSpacingMm=0.1)
    assert refinement.accepted, refinement.reason
