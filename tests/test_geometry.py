"""The notebook's geometry, number for number. If these break, users' volumes land
in the wrong place in their template and every downstream voxel is wrong."""

import numpy as np
import pytest

from ambasync.geometry import output_geometry, reorient, resolution_um
from helpers import NOTEBOOK_DIMS, NOTEBOOK_SIZES, NOTEBOOK_STARTS, NOTEBOOK_STEPS, notebook_ras

GRID = (58, 41, 67)  # C-order shape of an Allen 200 µm grid (PIR)


def test_default_geometry_is_the_notebooks():
    g = output_geometry(GRID, "RAS", "MICe", 1.0)
    assert g.dimnames == NOTEBOOK_DIMS
    assert g.sizes == NOTEBOOK_SIZES
    assert g.starts == pytest.approx(NOTEBOOK_STARTS)
    assert g.steps == pytest.approx(NOTEBOOK_STEPS)
    assert (g.x_cosines, g.y_cosines, g.z_cosines) == ((1, 0, 0), (0, 1, 0), (0, 0, 1))


@pytest.mark.parametrize(
    "orientation, space, centres_um, cosines",
    [
        # centres (x, y, z) and cosines copied from the notebook's tables
        ("RAS", "CCFv3", (0, 13200, 8000), ((0, 0, 1), (-1, 0, 0), (0, -1, 0))),
        ("PIR", "MICe", (5300, 5300, 5700), ((0, -1, 0), (0, 0, -1), (1, 0, 0))),
        ("PIR", "CCFv3", (0, 0, 0), ((1, 0, 0), (0, 1, 0), (0, 0, 1))),
    ],
)
@pytest.mark.parametrize("expansion", [1.0, 10.0])
def test_other_spaces_follow_the_notebook_tables(orientation, space, centres_um, cosines, expansion):
    g = output_geometry(GRID, orientation, space, expansion)
    # starts = minus the reversed centres * expansion / 1000; steps = 200 µm * expansion / 1000
    assert g.starts == pytest.approx(tuple(-expansion * c / 1000 for c in reversed(centres_um)))
    assert g.steps == pytest.approx((0.2 * expansion,) * 3)
    assert (g.x_cosines, g.y_cosines, g.z_cosines) == cosines
    assert g.sizes == ((41, 67, 58) if orientation == "RAS" else GRID)


def test_resolution_comes_from_the_grid_size_and_unknown_sizes_are_refused():
    assert resolution_um(58 * 41 * 67) == 200
    assert resolution_um(132 * 80 * 114) == 100
    assert output_geometry((114, 80, 132), "RAS", "MICe", 1.0).steps == pytest.approx((0.1,) * 3)
    with pytest.raises(ValueError, match="not one of the Allen grid sizes"):
        resolution_um(58 * 41 * 66)


def test_ras_reorientation_equals_the_notebooks_rot90s_and_pir_keeps_the_order():
    raw = np.random.default_rng(1).random(GRID, dtype=np.float32)
    ras = reorient(raw, "RAS")
    assert ras.shape == NOTEBOOK_SIZES and ras.flags.c_contiguous
    np.testing.assert_array_equal(ras, notebook_ras(raw))
    # one voxel by hand: RAS[a, b, c] = PIR[c, 40 - a, 66 - b]  (S->I and A->P flipped into I->S, P->A)
    assert ras[3, 5, 7] == raw[7, 40 - 3, 66 - 5]
    np.testing.assert_array_equal(reorient(raw, "PIR"), raw)
    with pytest.raises(ValueError):
        reorient(raw, "LPS")
