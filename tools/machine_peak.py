"""The CPU's fp32 peak from `lscpu`, and achieved GFLOP/s against it.

peak = physical cores × 2 vector pipes × fp32 lanes × (2 with FMA, else 1) × base clock.
- lanes: 16 with AVX-512 (`avx512f`), 8 with AVX (`avx`), 4 with SSE; AMD Zen 4 (family 25)
  runs AVX-512 on 256-bit units, so 8 there.
- 2 pipes: two FMA units per core (Haswell and later, Zen); without FMA, one add and one
  multiply pipe. Xeons with a single AVX-512 FMA unit (some Silver / Bronze) reach half.
- base clock, first found: the model name's "@ X GHz" (Intel's nominal clock); BogoMIPS / 2
  (x86 Linux computes it from the TSC, which runs at the nominal clock: what a VM reports
  when the model name has none); "CPU max MHz" (the turbo ceiling, so the peak is an upper
  bound). Turbo clocks run above the base, so a core can exceed 100 % of this peak.
"""
from __future__ import annotations

import re
import subprocess


def cpu_peak(lscpu: str) -> dict:
    """{"gflops", "cores", "lanes", "fma", "ghz", "source"} from `lscpu`'s text; "gflops" is
    None (and "source" says why) where it cannot be worked out."""
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("Flags", "").split())
    out = {"gflops": None, "cores": None, "lanes": None, "fma": "fma" in flags, "ghz": None, "source": None}
    if fields.get("Architecture") not in ("x86_64", "i686"):
        out["source"] = f"unknown: vector units of architecture {fields.get('Architecture')!r} not modelled"
        return out
    sockets = int(fields.get("Socket(s)", "1"))
    if "Core(s) per socket" in fields:
        cores = int(fields["Core(s) per socket"]) * sockets
    else:
        cores = int(fields["CPU(s)"]) // int(fields.get("Thread(s) per core", "1"))
    zen4 = fields.get("Vendor ID") == "AuthenticAMD" and fields.get("CPU family") == "25"
    lanes = 16 if "avx512f" in flags and not zen4 else 8 if "avx" in flags else 4
    clock = re.search(r"@\s*([\d.]+)\s*GHz", fields.get("Model name", ""))
    if clock:
        ghz, source = float(clock.group(1)), f"model name {clock.group(0)!r}"
    elif "BogoMIPS" in fields:
        ghz, source = float(fields["BogoMIPS"]) / 2000, f"BogoMIPS {fields['BogoMIPS']} / 2"
    elif "CPU max MHz" in fields:
        ghz, source = float(fields["CPU max MHz"]) / 1000, f"CPU max MHz {fields['CPU max MHz']} (turbo)"
    else:
        out.update(cores=cores, lanes=lanes, source="unknown: no clock in lscpu")
        return out
    flops_per_cycle = 2 * lanes * (2 if out["fma"] else 1)
    out.update(gflops=cores * flops_per_cycle * ghz, cores=cores, lanes=lanes, ghz=ghz,
               source=f"{cores} cores × 2 pipes × {lanes} fp32 lanes × {2 if out['fma'] else 1} "
                      f"({'FMA' if out['fma'] else 'no FMA'}) × {ghz:g} GHz ({source})")
    return out


def machine_peak() -> dict:
    """cpu_peak of this machine's `lscpu` (C locale)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True,
                              env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"}).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        return {"gflops": None, "source": f"unknown: lscpu failed ({err})"}
    return cpu_peak(text)


def gflops(flops: float | None, seconds: float) -> float | None:
    return None if flops is None else flops / seconds / 1e9
