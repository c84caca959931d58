"""How often CUDA's torch gives other bits for `x / scalar` than for true division (on a CUDA machine).

torch divides a CUDA tensor by a Python scalar as a multiplication by the scalar's reciprocal; the quantizer's
scale (`codecs.quant.quantize`) divides by the number of levels, so it divides by a tensor to keep the CPU's bits
(docs/kernels.md). Prints, for each level count, how many of 4M random values differ between the two and the CPU.

    python benchmarks/cuda_scalar_division.py
"""
import torch

g = torch.Generator(device="cuda").manual_seed(0)
a = torch.randn(1 << 22, device="cuda", generator=g) * 6000
for lv in (3, 7, 15, 255):
    x = a / lv
    y = a / torch.full_like(a, lv)
    c = (a.cpu() / lv).cuda()
    print(f"levels {lv}: scalar vs tensor differ in {(x != y).sum().item()}, tensor vs CPU differ in "
          f"{(y != c).sum().item()}, scalar vs CPU {(x != c).sum().item()}")
