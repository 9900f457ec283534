"""Record vae-toolkit 0.1.0 outputs for tests/test_backward_compatibility.py.

Run with the published 0.1.0 wheel and torchvision installed (not this project), e.g.
    python -m venv /tmp/ref && /tmp/ref/bin/pip install torch torchvision numpy Pillow diffusers
    /tmp/ref/bin/pip install --no-deps vae-toolkit==0.1.0
    /tmp/ref/bin/python tests/data/make_reference_010.py tests/data/reference_010.npz
"""

import io
import sys

import numpy as np
import torch
from PIL import Image

import vae_toolkit

assert vae_toolkit.__version__ == "0.1.0", vae_toolkit.__version__


def photo_like(rng, h, w, channels=3):
    y, x = np.mgrid[0:h, 0:w]
    base = (x * 255 / max(w - 1, 1) * 0.6 + y * 255 / max(h - 1, 1) * 0.4)[..., None]
    noise = rng.normal(0, 25, size=(h, w, channels))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def main(out):
    rng = np.random.default_rng(1234)
    rec = {}
    # pil_to_tensor / ImageProcessor with resize + center crop (odd sizes exercise the rounding)
    sizes = [(37, 23), (23, 37), (64, 64), (50, 31), (17, 17), (101, 64), (8, 300)]
    for n, (h, w) in enumerate(sizes):
        arr = photo_like(rng, h, w)
        img = Image.fromarray(arr)
        rec[f"pil{n}_input"] = arr
        for ts in (16, 21, 32):
            rec[f"pil{n}_t{ts}_norm"] = vae_toolkit.pil_to_tensor(img, target_size=ts).numpy()
        rec[f"pil{n}_t16_raw"] = vae_toolkit.pil_to_tensor(img, target_size=16, normalize=False).numpy()
        rec[f"pil{n}_none"] = vae_toolkit.pil_to_tensor(img).numpy()
        proc = vae_toolkit.ImageProcessor(
            target_size=20, normalize_mean=(0.485, 0.456, 0.406), normalize_std=(0.229, 0.224, 0.225)
        )
        rec[f"pil{n}_proc"] = proc.preprocess_pil(img).numpy()
    # other modes through pil_to_tensor (converted to RGB)
    gray = photo_like(rng, 30, 40, 1)[..., 0]
    rec["mode_L_input"] = gray
    rec["mode_L"] = vae_toolkit.pil_to_tensor(Image.fromarray(gray, "L"), target_size=24).numpy()
    rgba = photo_like(rng, 30, 40, 4)
    rec["mode_RGBA_input"] = rgba
    rec["mode_RGBA"] = vae_toolkit.pil_to_tensor(Image.fromarray(rgba, "RGBA"), target_size=24).numpy()
    # load_and_preprocess_image from PNG bytes (all 256 levels present)
    arr = photo_like(rng, 32, 32)
    arr.reshape(-1)[:256] = np.arange(256, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    rec["png_bytes"] = np.frombuffer(buf.getvalue(), dtype=np.uint8)
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "x.png")
        open(p, "wb").write(buf.getvalue())
        t, _ = vae_toolkit.load_and_preprocess_image(p, target_size=32)
    rec["png_tensor"] = t.numpy()
    # tensor_to_pil on decoded-like tensors (0.1.0 truncates)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 24, 40, generator=g) * 2.2 - 1.1
    rec["t2p_input"] = x.numpy()
    rec["t2p_output"] = np.asarray(vae_toolkit.tensor_to_pil(x))
    np.savez_compressed(out, **rec)
    print("wrote", out, len(rec), "arrays")


if __name__ == "__main__":
    main(sys.argv[1])
