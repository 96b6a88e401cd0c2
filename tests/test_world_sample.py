"""world.sample: seeded identities and views in their stated ranges, FLAME axis-angle poses against scipy's
rotations, and renders that are deterministic, in the generator's range, with the landmarks on the head."""
import torch
from scipy.spatial.transform import Rotation

from world import head, sample


def test_views_are_in_range_and_their_poses_are_scipys_rotations():
    v = sample.views(64, torch.Generator().manual_seed(3))
    yaw, pitch, roll = v["angles"].unbind(1)
    assert yaw.abs().max() <= sample.YAW and pitch.abs().max() <= sample.PITCH and roll.abs().max() <= sample.ROLL
    assert yaw.abs().max() > 0.8 * sample.YAW  # the range is used
    want = Rotation.from_euler("YXZ", v["angles"].numpy()).as_rotvec()  # intrinsic: R_y · R_x · R_z
    assert torch.allclose(v["pose"][:, :3], torch.from_numpy(want), atol=1e-9)
    assert ((v["pose"][:, 3] >= 0) & (v["pose"][:, 3] <= sample.JAW)).all() and (v["pose"][:, 4:] == 0).all()


def test_renders_are_deterministic_and_landmarks_land_on_the_head():
    Fl = head.flame_head()

    def draw(seed):
        rng = torch.Generator().manual_seed(seed)
        return sample.render_views(Fl, sample.identities(4, rng), sample.views(4, rng), size=64)
    img, lm = draw(7)
    again, _ = draw(7)
    other, _ = draw(8)
    assert torch.equal(img, again) and not torch.equal(img, other)
    assert img.shape == (4, 3, 64, 64) and img.min() >= -1 and img.max() <= 1
    on_head = (img > -1).any(1)                                  # (4, 64, 64): not background
    idx = lm.round().long().clamp(0, 63)
    hits = torch.stack([on_head[i, idx[i, :, 1], idx[i, :, 0]] for i in range(4)])
    assert hits.float().mean() > 0.95
