"""eval.py end to end on the tiny default: the grid it writes holds the images the API gives."""
import json
import struct
import zlib

import pytest
import torch

import eval as ev
import stylemask as sm


def read_png(path):
    """Decode an 8-bit RGB PNG written with filter 0 (what write_png writes) -> (H, W, 3) uint8."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", None
    while pos < len(data):
        n, tag = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        assert zlib.crc32(tag + body) & 0xFFFFFFFF == struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0]
        if tag == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif tag == b"IDAT":
            idat += body
        pos += 12 + n
    W, H = size
    raw = torch.frombuffer(bytearray(zlib.decompress(idat)), dtype=torch.uint8).reshape(H, 1 + 3 * W)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(H, W, 3)


def test_eval_grid_shows_source_target_and_reenacted(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sm, "WEIGHTS_DIR", tmp_path / "no-weights")
    assert ev.main(["--n", "3", "--batch", "2", "--seed", "5", "--size", "64", "--out", str(tmp_path)]) == 0
    assert "TINY" in capsys.readouterr().out
    grid = read_png(tmp_path / "eval_grid.png")
    assert grid.shape == (3 * 64, 3 * 64, 3)
    G, M = sm.tiny_generator(), sm.init_mask(sm.tiny_generator(), seed=5)
    gen = torch.Generator().manual_seed(5)
    z_s, z_t = torch.randn(3, 32, generator=gen), torch.randn(3, 32, generator=gen)
    s_s, s_t = (sm.styles(G, sm.mapping(G, z, 0.7)) for z in (z_s, z_t))
    want = sm.image_grid([sm.synthesis(G, s) for s in (s_s, s_t, sm.reenact(s_s, s_t, M))], 64)
    assert (grid.int() - want.int()).abs().max() <= 1  # batching may move a pixel by one level
    cfg = json.loads((tmp_path / "eval_config.json").read_text())
    assert cfg["tiny_default"] and cfg["n"] == 3


def test_eval_refuses_a_missing_generator_file(tmp_path):
    with pytest.raises(sm.StyleMaskError, match="no such file"):
        ev.main(["--generator", str(tmp_path / "absent.safetensors"), "--out", str(tmp_path)])
    assert not (tmp_path / "eval_grid.png").exists()
