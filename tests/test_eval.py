"""eval.py: each metric against hand-computed values, and the whole run on the tiny defaults."""
import json
import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation
from torch.testing import assert_close

import cli
import eval as ev
import facenets as fn
import stylemask as sm
import weights
from weights import defaults


def read_png(path):
    """Decode an 8-bit RGB PNG -> (H, W, 3) uint8 (Pillow)."""
    from PIL import Image
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        return torch.from_numpy(np.array(im))


# --- Metrics on constructed inputs -------------------------------------------------------------

def test_csim_is_one_for_identical_and_zero_for_orthogonal_features():
    f = torch.randn(3, 512, generator=torch.Generator().manual_seed(0))
    assert_close(ev.csim(f, f.clone()), torch.ones(3))
    a, b = torch.zeros(1, 512), torch.zeros(1, 512)
    a[0, 0], b[0, 1] = 2.0, 3.0
    assert ev.csim(a, b).item() == 0.0


def test_a_known_rotation_gives_the_known_pose_error():
    # DECA's yaw axis: a rotation of −10° about y is yaw +10 (facenets.axis_angle_to_euler's convention)
    aa = torch.from_numpy(Rotation.from_euler("y", [[0.0], [-10.0]], degrees=True).as_rotvec()).float()
    euler = fn.axis_angle_to_euler(aa) * (180 / math.pi)
    err = ev.pose_error(euler[1:], euler[:1])
    assert err.item() == pytest.approx(10 / 3, abs=1e-3)  # yaw off by 10°, pitch and roll exact
    assert ev.pose_error(euler, euler).abs().max().item() == 0.0


def test_expression_errors_by_hand():
    exp_t = torch.zeros(1, 50)
    exp_r = torch.zeros(1, 50)
    exp_r[0, 0], exp_r[0, 30] = 1.0, -2.0
    assert ev.expr_error(exp_r, exp_t).item() == pytest.approx(3 / 50)
    ranges = torch.tensor([[-1.0, 1.0]] * 54, dtype=torch.float64)
    ranges[3] = torch.tensor([0.0, 0.5])  # jaw range 0.5
    ranges[4] = torch.tensor([-2.0, 2.0])  # exp_0 range 4
    got = ev.expr_error_normalized(torch.tensor([0.25]), exp_r.double(), torch.tensor([0.0]), exp_t.double(), ranges)
    assert got.item() == pytest.approx((0.25 / 0.5 + 1.0 / 4) / 21)  # exp_30 is past the first 20: ignored


def test_nme_of_a_shifted_landmark_set():
    l_gt = torch.randn(2, 68, 3, generator=torch.Generator().manual_seed(1))
    l_gt[:, 36], l_gt[:, 45] = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([2.0, 0.0, 0.0])  # eye corners 2 apart
    shift = torch.tensor([0.3, 0.4, 0.0])  # |shift| = 0.5 at every landmark
    assert_close(ev.nme(l_gt + shift, l_gt), torch.full((2,), 0.25))
    assert ev.nme(l_gt, l_gt).abs().max().item() == 0.0


# --- The whole run on the tiny defaults ---------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    mp = pytest.MonkeyPatch()
    mp.setattr(weights, "DIR", out / "no-weights")
    try:
        assert ev.main(["--pairs", "6", "--batch", "4", "--seed", "5", "--size", "64", "--grid-pairs", "3",
                        "--range-samples", "8", "--out", str(out)]) == 0
    finally:
        mp.undo()
    return out


def test_reference_rows_bound_the_metrics(tiny_run):
    res = json.loads((tiny_run / "results.json").read_text())
    r, settings = res["results"], res["settings"]
    assert settings["origin"] == "tiny" and settings["pairs"] == 6 and "36, 45" in settings["nme_normaliser"]
    src, tgt = r["source"], r["target"]
    method = r["StyleMask (untrained)"]
    assert src["csim"] == pytest.approx(1.0, abs=1e-5)  # the source is itself
    assert tgt["pose"] == 0 and tgt["expr"] == 0 and tgt["expr_norm"] == 0  # the target is itself
    assert method["csim"] <= src["csim"] + 1e-6 and method["pose"] >= tgt["pose"] and method["expr"] >= tgt["expr"]
    assert src["pose"] > 0 and tgt["csim"] < 1


def test_grid_and_table(tiny_run):
    grid = read_png(tiny_run / "grid.png")
    assert grid.shape == (cli.TITLE_HEIGHT + 3 * 64, 3 * 64, 3)  # titles, then 3 pairs × (source | target | method)
    G = defaults.tiny_generator()
    gen = torch.Generator().manual_seed(5)
    z_s, z_t = torch.randn(6, 32, generator=gen), torch.randn(6, 32, generator=gen)
    s_s, s_t = (sm.styles(G, sm.mapping(G, z[:3], 0.7)) for z in (z_s, z_t))
    want = cli.image_grid([sm.synthesis(G, s) for s in (s_s, s_t)], 64)
    assert (grid[cli.TITLE_HEIGHT:, :128].int() - want.int()).abs().max() <= 1  # batching may move a pixel by one level
    table = (tiny_run / "table.md").read_text()
    assert "TINY" in table and "| source |" in table and "CSIM" in table and "NME" in table
    ranges = json.loads((tiny_run / "expression_ranges.json").read_text())
    assert len(ranges["ranges"]) == 54 and ranges["labels"][3] == "jaw"


def test_eval_refuses_a_missing_generator_file(tmp_path):
    with pytest.raises(sm.StyleMaskError, match="no such file"):
        ev.main(["--generator", str(tmp_path / "absent.safetensors"), "--out", str(tmp_path)])
    assert not (tmp_path / "grid.png").exists()
