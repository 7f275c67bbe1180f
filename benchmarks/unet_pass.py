"""Time one network pass (UNet at one DDIM step, and the semantic encoder) for the published and the demo DAE.

A DDIM run costs (steps x images) UNet passes, so this number times the pass counts of benchmarks/speed.py gives the
run time of any preset on this machine. Random weights: the time does not depend on their values.

    python benchmarks/unet_pass.py [--batch 16] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from hideseek.device import bf16_is_fast
from hideseek.importer import PUBLISHED_ARCHITECTURE
from hideseek.network import DiffusionAutoencoder
from hideseek.training import DEMO_ARCHITECTURE


@torch.inference_mode()
def time_model(name: str, model: DiffusionAutoencoder, batch: int, repeats: int = 3) -> None:
    size = model.config.image_size
    x = torch.randn(batch, 1, size, size)
    t = torch.full((batch,), 500)
    z = model.encode(x)
    model(x, t, z)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        model(x, t, z)
    unet = (time.perf_counter() - start) / repeats / batch
    start = time.perf_counter()
    for _ in range(repeats):
        model.encode(x)
    enc = (time.perf_counter() - start) / repeats / batch
    print(f"| {name} | {model.num_parameters() / 1e6:.1f} M | {batch} | {1000 * unet:.1f} | {1000 * enc:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, float32 "
          f"(bf16 native here: {bf16_is_fast('cpu')})")
    print("| model | parameters | batch | UNet pass, ms / image | encoder, ms / image |")
    print("| --- | --- | --- | --- | --- |")
    models = (("published (Atad et al.)", PUBLISHED_ARCHITECTURE), ("hideseek-phantom-demo", DEMO_ARCHITECTURE))
    for name, cfg in models:
        time_model(name, DiffusionAutoencoder(cfg).eval(), args.batch)


if __name__ == "__main__":
    main()
