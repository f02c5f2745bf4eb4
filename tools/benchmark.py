"""Benchmark: what a unit adds to a sampling step, and what face analysis and image encoding cost.

Prints figures (it asserts nothing):
- per-step time of the webui's UNet (the real ldm class in SDXL topology, random weights) plain,
  with an IP-Adapter unit (4 tokens), with InstantID's IP attention (16 tokens), and with InstantID's
  IP attention + IdentityNet; the ratio to plain and IdentityNet's share of the step;
- face analysis of one photo: first run (session creation + detection + recognition) and a
  repeated generation with the same photo (served from the content cache);
- how often the CLIP image encoder runs for one reference over three generations.

    python tools/benchmark.py                      # reduced width, CPU (minutes on 2 cores)
    python tools/benchmark.py --full --device cuda --dtype fp16 --size 128   # full-size SDXL on a GPU

Needs the test requirements (ldm from stable-diffusion-sdkit, insightface, onnx, scikit-image).
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from lib_instantid.identitynet import INSTANTID_CONFIG, IdentityNet  # noqa: E402
from lib_instantid.instantid import KpsHint  # noqa: E402
from lib_instantid.ip_attention import AttentionUnit  # noqa: E402
from lib_instantid.lora import LoraPatch  # noqa: E402
from lib_instantid.residuals import ControlUnit  # noqa: E402
from lib_instantid.session import GenerationPatch, Schedule  # noqa: E402
from lib_instantid.unet_layers import cross_attention_layers  # noqa: E402


def build(full: bool, device, dtype):
    from unets import sdxl_like, _no_zero_params
    if full:
        from unets import sdxl_full_meta
        unet = sdxl_full_meta().to_empty(device=device)
        with torch.no_grad():
            for p in unet.parameters():
                p.normal_(0, 0.02)
        config = dict(INSTANTID_CONFIG)
    else:
        unet = _no_zero_params(sdxl_like(width=128, depth=2))
        config = dict(INSTANTID_CONFIG, block_out_channels=[128, 256, 512], attention_head_dim=[2, 4, 8],
                      transformer_layers_per_block=[1, 2, 2])
    unet = unet.to(device, dtype).eval()
    with torch.device("meta"):
        net = IdentityNet(config)
    net = net.to_empty(device=device)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
    net = net.to(dtype).eval()
    g = torch.Generator().manual_seed(0)
    weights = {l.index: (torch.randn(l.inner_dim, 2048, generator=g) * 0.02,
                         torch.randn(l.inner_dim, 2048, generator=g) * 0.02) for l in cross_attention_layers(unet)}
    tokens = torch.randn(2, 16, 2048, generator=g)
    return unet, net, weights, tokens


def time_steps(fn, repeats):
    """Median seconds of ``repeats`` calls (one call when repeats is 0)."""
    times = []
    for _ in range(max(1, repeats)):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_figures(args):
    device, dtype = torch.device(args.device), {"fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    unet, net, weights, tokens = build(args.full, device, dtype)
    from unets import CallsUNet
    model = CallsUNet(unet)
    b, s = 2, args.size
    x = torch.randn(b, 4, s, s, device=device, dtype=dtype)
    t = torch.full((b,), 500.0, device=device)
    ctx = torch.randn(b, 77, 2048, device=device, dtype=dtype)
    y = torch.randn(b, 2816, device=device, dtype=dtype)
    kps = np.array([[40, 50], [80, 52], [60, 75], [45, 95], [78, 96]], np.float32) * (s / 16)
    hint = KpsHint(kps, (s * 8, s * 8))

    def step():
        with torch.no_grad():
            model(x, t, context=ctx, y=y)

    ipa_tokens = tokens[:, :4].contiguous()     # an IP-Adapter unit (base / FaceID): 4 tokens

    layers = cross_attention_layers(unet)

    def patched(name):
        if name == "ipadapter":
            return GenerationPatch(unet, [(AttentionUnit("bench", ipa_tokens, weights), Schedule(0.8))])
        if name == "faceid":
            return GenerationPatch(unet, [(AttentionUnit("bench", ipa_tokens, weights), Schedule(0.8))],
                                   loras=[LoraPatch(layers, faceid_lora(layers), 1.0)])
        unit = AttentionUnit("bench", tokens, weights)
        control = [(ControlUnit("bench", net, tokens, hint), Schedule(0.8))] if name == "instantid" else []
        return GenerationPatch(unet, [(unit, Schedule(0.8))], control)

    # interleave the configurations so that machine load affects them alike
    times = {"plain": [], "ipadapter": [], "faceid": [], "instantid_ip": [], "instantid": []}
    names = list(times)
    for r in range(args.repeats + 1):
        for name in names[r % len(names):] + names[:r % len(names)]:     # rotate the order per round
            patch = None if name == "plain" else patched(name)
            if patch is not None:
                patch.install()
                patch.begin_step(x, 1, 0, 10, model)
            try:
                elapsed = time_steps(step, 0) if r else (step() or 0.0)   # round 0 warms up
            finally:
                if patch is not None:
                    patch.remove()
            if r:
                times[name].append(elapsed)
    # times: median over rounds; ratios: median of each round's ratio to that round's plain step
    # (paired, so that slow phases of a loaded machine cancel out)
    ratio = {k: statistics.median(t / p for t, p in zip(times[k], times["plain"])) for k in times}
    med = {k: statistics.median(v) for k, v in times.items()}
    n = len(cross_attention_layers(unet))
    print(f"UNet step, batch {b} (cond + uncond), latent {s}x{s}, {'full-size SDXL' if args.full else 'reduced width'},"
          f" {n} cross-attention layers, {args.device} {args.dtype}, {args.repeats} rounds")
    print(f"  plain UNet                          {med['plain'] * 1000:8.1f} ms")
    for key, label in (("ipadapter", "+ IP-Adapter unit (4 tokens)"), ("faceid", "+ FaceID unit (4 tok. + LoRA 128)"),
                       ("instantid_ip", "+ InstantID IP attention (16 tok.)")):
        print(f"  {label:36s}{med[key] * 1000:8.1f} ms   x{ratio[key]:.3f}  ({(ratio[key] - 1) * 100:+.1f} %)")
    print(f"  + InstantID IP + IdentityNet        {med['instantid'] * 1000:8.1f} ms   x{ratio['instantid']:.3f}")
    print("  measured inside the hooks (not by difference, so other load on the machine does not enter):")
    for key, label in (("ipadapter", "IP-Adapter unit"), ("instantid_ip", "InstantID IP attention")):
        inside = hook_time(patched(key), step, model, x)
        print(f"    {label} hooks: {inside * 1000:.1f} ms per step = {inside / med['plain'] * 100:.2f} % of the plain step")
    inside = hook_time(patched("instantid"), step, model, x, what="identitynet")
    print(f"    IdentityNet: {inside * 1000:.1f} ms per step = {inside / med['plain'] * 100:.1f} % of the plain step")


def faceid_lora(layers, rank=128):
    """A FaceID-shaped LoRA (rank 128 on q/k/v/out of every attention) for ``layers``."""
    g = torch.Generator().manual_seed(1)
    lora = {}
    for layer in layers:
        for n, attn in ((2 * layer.index, layer.self_attn), (2 * layer.index + 1, layer.module)):
            lora[n] = {}
            for proj in ("to_q", "to_k", "to_v", "to_out"):
                linear = attn.to_out[0] if proj == "to_out" else getattr(attn, proj)
                lora[n][f"{proj}_lora.down.weight"] = torch.randn(rank, linear.in_features, generator=g) * 0.01
                lora[n][f"{proj}_lora.up.weight"] = torch.randn(linear.out_features, rank, generator=g) * 0.01
    return lora


def hook_time(patch, step, model, x, repeats=5, what="attention"):
    """Seconds per step spent inside the IP attention hooks or IdentityNet (timed around them)."""
    from lib_instantid import ip_attention, residuals
    spent = [0.0]
    owner, attr = ((ip_attention.IPAttentionPatch, "add_image_terms") if what == "attention"
                   else (residuals.ResidualPatch, "compute"))
    original = getattr(owner, attr)

    def timed(self, *args):
        t0 = time.perf_counter()
        try:
            return original(self, *args)
        finally:
            spent[0] += time.perf_counter() - t0

    setattr(owner, attr, timed)
    try:
        with patch:
            patch.begin_step(x, 1, 0, 10, model)
            step()
            spent[0] = 0.0
            for _ in range(repeats):
                step()
    finally:
        setattr(owner, attr, original)
    return spent[0] / repeats


def encoder_figures():
    """The CLIP image encoder runs once per reference image, not once per generation."""
    from conftest import write_small_clip_h
    from skimage import data
    from lib_instantid.model_cache import ModelCache
    from lib_instantid.model_files import ModelEntry, inspect
    from lib_instantid.references import ClipEncoding

    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "clip_h_2_layers.safetensors")
    write_small_clip_h(path)
    cache = ModelCache()
    enc = ClipEncoding(ModelEntry("clip_h", path, inspect(path)), "cpu", torch.float32, cache)
    image = data.astronaut()
    times = []
    for _ in range(3):                           # three generations with the same reference
        t0 = time.perf_counter()
        enc.encode(image, hidden=True)
        enc.zero_image(hidden=True)
        times.append(time.perf_counter() - t0)
    print("CLIP image encoder (ViT-H-14 widths, 2 of 32 layers), one reference, three generations:")
    print(f"  encoder runs: {cache.computed} (the reference + the zero image for uncond), times "
          + ", ".join(f"{t * 1000:.1f} ms" for t in times))


def face_figures():
    from face_pack import ASTRONAUT_BOX, ASTRONAUT_KPS, build_pack
    from skimage import data
    from lib_instantid.face_analysis import FaceAnalyzer

    root = tempfile.mkdtemp()
    build_pack(root, det="constant", faces=[(ASTRONAUT_BOX, ASTRONAUT_KPS, 0.98)], image_size=(512, 512))
    image = data.astronaut()
    analyzer = FaceAnalyzer(root, "cpu")
    t0 = time.perf_counter()
    analyzer.analyze(image)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(20):
        analyzer.analyze(image)
    cached = (time.perf_counter() - t0) / 20
    print("Face analysis, 512x512 photo (synthetic antelopev2 stand-ins, real insightface code path):")
    print(f"  first generation   {first * 1000:8.1f} ms (model load + detection + recognition)")
    print(f"  same photo again   {cached * 1000:8.3f} ms (content cache; analysis runs: {analyzer.runs})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="full-size SDXL UNet and IdentityNet (needs a GPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    ap.add_argument("--size", type=int, default=32, help="latent size (128 = 1024 px)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--no-face", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    step_figures(args)
    if not args.no_face:
        face_figures()
        encoder_figures()


if __name__ == "__main__":
    main()
