"""Published peak matmul rates of GPUs: Apple per GPU core, NVIDIA per product (dense bf16).

Read by backends/flops.py (the MFU denominator) and backends/tiers.py (which NVIDIA GPUs are in
the H100's league). Each figure cites its source; a GPU missing here is measured instead.
"""

import re

# Apple GPUs: dense fp16/bf16 FLOP/s per GPU core. M1-M4 cores have 128 FP32 ALUs and run
# fp16/bf16 matmuls at the FP32 rate, so a core does 256 FLOP per clock (one FMA per ALU). Where
# Apple quotes no TFLOPS, that is multiplied by a third-party GPU clock reading (approximate).
APPLE_FLOPS_PER_GPU_CORE = {
    "M1": 0.325e12,  # Apple M1 launch (Nov 2020): 2.6 TFLOPS from 8 GPU cores; M1 Pro/Max: 5.2/10.4 from 16/32
    "M2": 0.358e12,  # 256 FLOP/clock x 1.398 GHz (TechPowerUp GPU database, "Apple M2 GPU"): 3.6 TFLOPS at 10 cores
    "M3": 0.353e12,  # 256 FLOP/clock x 1.38 GHz (TechPowerUp GPU database, "Apple M3 GPU")
    "M4": 0.376e12,  # 256 FLOP/clock x 1.47 GHz (TechPowerUp GPU database, "Apple M4 GPU")
    "M5": 1.505e12,  # Apple M5 announcement (Oct 2025): a Neural Accelerator in every GPU core gives "over 4x
                     # the peak GPU compute for AI" of M4 at the same 10 cores, so 4 x the M4 figure
}
# Only used when system_profiler gave no core count: a common configuration of each tier.
APPLE_TYPICAL_GPU_CORES = {"base": 10, "Pro": 16, "Max": 32, "Ultra": 64}

# NVIDIA: dense (no sparsity) BF16 tensor-core FLOP/s, matched against torch.cuda.get_device_name()
# in order (first match wins). Datasheets quote "with sparsity" figures; dense is half of those.
NVIDIA_BF16_FLOPS = (
    (r"GB200|B200", 2.25e15),    # NVIDIA HGX B200 datasheet: FP16/BF16 4.5 PFLOPS per GPU with sparsity
    (r"H200 NVL", 835e12),       # NVIDIA H200 datasheet: H200 NVL BF16 1,671 TFLOPS with sparsity
    (r"H200", 989e12),           # NVIDIA H200 datasheet (H200 SXM) and GH200 datasheet: 1,979 with sparsity
    (r"H100 NVL", 835e12),       # NVIDIA H100 datasheet: H100 NVL BF16 1,671 TFLOPS with sparsity
    (r"H100 PCIe", 756e12),      # NVIDIA H100 datasheet: H100 PCIe BF16 1,513 TFLOPS with sparsity
    (r"H100", 989e12),           # NVIDIA H100 datasheet: H100 SXM BF16 1,979 TFLOPS with sparsity
    (r"A100", 312e12),           # NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity)
    (r"L40S", 362e12),           # NVIDIA L40S datasheet: BF16 Tensor 362.05 TFLOPS (733 with sparsity)
    (r"L40\b", 181e12),          # NVIDIA L40 datasheet: BF16 Tensor 181.05 TFLOPS (362.1 with sparsity)
    (r"\bL4\b", 121e12),         # NVIDIA L4 datasheet: BF16 Tensor Core 242 TFLOPS with sparsity
    (r"\bA40\b", 149.7e12),      # NVIDIA A40 datasheet: BF16 Tensor 149.7 TFLOPS (299.4 with sparsity)
    (r"\bA10\b", 125e12),        # NVIDIA A10 datasheet: BF16 Tensor Core 125 TFLOPS (250 with sparsity)
    (r"RTX 5090", 209.5e12),     # NVIDIA RTX Blackwell GPU architecture whitepaper: BF16 FP32-accumulate 209.5
    (r"RTX 4090(?! ?D)", 165.2e12),  # NVIDIA Ada Lovelace GPU architecture whitepaper: BF16 FP32-acc. 165.2
    (r"RTX 3090(?! Ti)", 71e12),     # NVIDIA Ampere GA102 GPU architecture whitepaper: BF16 FP32-acc. 71
    (r"V100", 125e12),           # NVIDIA V100 datasheet: 125 TFLOPS tensor (FP16; Volta has no BF16)
    (r"\bT4\b", 65e12),          # NVIDIA T4 datasheet: 65 TFLOPS mixed precision (FP16; Turing has no BF16)
)



def apple_gpu_flops(info):
    """(FLOP/s, how) for an Apple GPU from its generation and core count.

    A generation newer than the table uses the newest known per-core rate; an unknown core count
    assumes a common configuration of the tier. Both say so in `how`.
    """
    generation, tier = info.get("generation"), info.get("tier")
    known = sorted(APPLE_FLOPS_PER_GPU_CORE, key=lambda name: int(name[1:]))  # "M10" after "M9"
    rate_from = generation if generation in APPLE_FLOPS_PER_GPU_CORE else known[-1]
    cores = info.get("gpu_cores")
    how = f"table: {cores} GPU cores x {APPLE_FLOPS_PER_GPU_CORE[rate_from] / 1e12:.3f} TFLOP/s per {rate_from} core"
    if cores is None:
        cores = APPLE_TYPICAL_GPU_CORES.get(tier, APPLE_TYPICAL_GPU_CORES["base"])
        how = f"estimated: core count unknown, assumed {cores} ({tier or 'base'} tier), {rate_from} per-core rate"
    elif rate_from != generation:
        how += f" (newest in table; {generation or 'this chip'} is not)"
    return cores * APPLE_FLOPS_PER_GPU_CORE[rate_from], how


def nvidia_gpu_flops(name):
    """Dense BF16 FLOP/s of an NVIDIA GPU from NVIDIA_BF16_FLOPS, or None if the name is not there."""
    for pattern, flops in NVIDIA_BF16_FLOPS:
        if re.search(pattern, name or "", re.IGNORECASE):
            return flops
    return None
