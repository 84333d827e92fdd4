"""Report figures follow Slicer's view conventions whatever the volume's axis order (ground truth by construction)."""
import numpy as np
import pytest

from MRIHistoRegLib import figures


def _markerVolume(ijkToRas, shapeKji, markerRas):
    """A zero volume with one bright voxel at the voxel centre nearest to `markerRas`."""
    array = np.zeros(shapeKji)
    ijk = np.linalg.solve(ijkToRas, np.r_[markerRas, 1.0])[:3]
    i, j, k = np.round(ijk).astype(int)
    array[k, j, i] = 1.0
    return array, (k, j, i)


# LPS-aligned (axial acquisition) and a coronal acquisition whose array axes run R->L, S->I, P->A
AXIAL_LPS = np.diag([-0.1, -0.1, 0.1, 1.0])
CORONAL = np.array([[-0.1, 0, 0, 0], [0, 0, 0.1, 0], [0, -0.1, 0, 0], [0, 0, 0, 1.0]])


@pytest.mark.parametrize("ijkToRas", [AXIAL_LPS, CORONAL], ids=["axial-LPS", "coronal"])
def test_views_put_anterior_superior_up_and_patient_left_on_the_right(ijkToRas):
    ijkToRas = ijkToRas.copy()
    ijkToRas[:3, 3] = -ijkToRas[:3, :3] @ np.array([20.0, 20.0, 20.0])  # RAS 0 at the centre of a 41^3 grid
    # marker: left (+x is right, so x < 0), anterior (y > 0), superior (z > 0)
    array, index = _markerVolume(ijkToRas, (41, 41, 41), np.array([-1.5, 1.0, 0.5]))
    expectations = {  # view -> (marker above the centre?, marker right of the centre?)
        "axial": (True, True),      # anterior up, patient left on screen right
        "coronal": (True, True),    # superior up, left on the right
        "sagittal": (True, False),  # superior up, anterior on the LEFT (posterior right)
    }
    for view, (up, right) in expectations.items():
        axis = figures.volumeAxisForView(ijkToRas, view)
        image = figures.orientedSlice(array, ijkToRas, view, index[axis])[0]
        row, col = np.argwhere(image == 1.0)[0]
        centre = (np.array(image.shape) - 1) / 2
        assert (row < centre[0]) == up, view
        assert (col > centre[1]) == right, view
