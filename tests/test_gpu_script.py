"""scripts/gpu_check.sh runs only on a CUDA machine; here, on the CPU, it is checked as far as
a CPU can: the shell parses, and every Python program it feeds to the interpreter compiles."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts/gpu_check.sh"


def test_gpu_check_script_parses_and_its_python_compiles():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    programs = re.findall(r"<<'EOF'\n(.*?)\nEOF\n", SCRIPT.read_text(), flags=re.S)
    assert len(programs) >= 2  # the Trainer's FSDP2 check, Accelerate's FSDP2 and Lightning's DeepSpeed
    for i, source in enumerate(programs):
        compile(source, f"gpu_check.sh heredoc {i}", "exec")
