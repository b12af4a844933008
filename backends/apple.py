"""Apple Silicon facts from `sysctl` and `system_profiler`: chip, generation, tier, cores, memory.

The only code here that needs a Mac is read_apple_info(), which runs the two commands. Everything
else parses their text, so tests feed it outputs recorded from every generation and tier
(tests/fixtures/apple/) and run on any machine.
"""

import re
import subprocess

# `sysctl` with names (not -n): each line says which value it is, so a name an older macOS lacks
# (hw.perflevel* arrived in macOS 12) only drops its own line instead of shifting the others.
SYSCTL_COMMAND = (
    "sysctl", "machdep.cpu.brand_string", "hw.memsize",
    "hw.perflevel0.physicalcpu", "hw.perflevel1.physicalcpu", "hw.ncpu",
)
PROFILER_COMMAND = ("system_profiler", "SPDisplaysDataType")
COMMAND_TIMEOUT_S = 30  # system_profiler takes about a second; a hung one must not hang training
TIERS = ("base", "Pro", "Max", "Ultra")
_CHIP_PATTERN = re.compile(r"\bApple (M\d+)(?: (\w+))?")
_GPU_CORES_PATTERN = re.compile(r"Total Number of Cores:\s*(\d+)")


def parse_sysctl(text):
    """{name: value} from `sysctl name ...` output ("name: value" lines); other lines ignored."""
    values = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() and " " not in name.strip():
            values[name.strip()] = value.strip()
    return values


def parse_chip_name(brand):
    """(generation, tier) from a brand string: "Apple M3 Max" -> ("M3", "Max"), "Apple M2" -> ("M2", "base").

    A later chip parses the same way ("Apple M7 Max" -> ("M7", "Max")); a tier word Apple has not
    used yet is kept as written. Anything that is not an Apple M chip gives (None, None).
    """
    match = _CHIP_PATTERN.search(brand or "")
    if not match:
        return None, None
    generation, tier = match.group(1), match.group(2)
    return generation, tier or "base"


def parse_gpu_cores(text):
    """GPU core count from `system_profiler SPDisplaysDataType` ("Total Number of Cores: N"), or None."""
    match = _GPU_CORES_PATTERN.search(text or "")
    return int(match.group(1)) if match else None


def _int_or_none(text):
    return int(text) if text and text.isdigit() else None


def parse_apple_info(sysctl_text, profiler_text):
    """Hardware-info fields (chip, generation, tier, gpu_cores, memory_gb, cpu_cores, ...) from the
    two commands' outputs. Missing values come back as None rather than failing."""
    values = parse_sysctl(sysctl_text)
    chip = values.get("machdep.cpu.brand_string")
    generation, tier = parse_chip_name(chip)
    memory_bytes = _int_or_none(values.get("hw.memsize"))
    perf_cores = _int_or_none(values.get("hw.perflevel0.physicalcpu"))
    efficiency_cores = _int_or_none(values.get("hw.perflevel1.physicalcpu"))
    logical_cpus = _int_or_none(values.get("hw.ncpu"))
    if perf_cores is not None:
        cpu_cores = perf_cores + (efficiency_cores or 0)
    else:
        cpu_cores = logical_cpus  # Apple cores run one thread each, so ncpu is the core count
    return {
        "chip": chip,
        "generation": generation,
        "tier": tier,
        "gpu_cores": parse_gpu_cores(profiler_text),
        "memory_gb": memory_bytes / 2**30 if memory_bytes else None,
        "cpu_cores": cpu_cores,
        "cpu_threads": logical_cpus or cpu_cores,
        "perf_cores": perf_cores,
        "efficiency_cores": efficiency_cores,
    }


def _run(command):
    """A command's stdout, or "" when it is missing, fails to start or hangs."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return result.stdout  # sysctl exits non-zero when one name is unknown but prints the rest


def read_apple_info():
    """parse_apple_info() on this Mac's live `sysctl` and `system_profiler` output (macOS only)."""
    return parse_apple_info(_run(SYSCTL_COMMAND), _run(PROFILER_COMMAND))
