"""fair-calib: post-training quantization of diffusion LLMs with FAIR-Calib and its baselines."""

from pathlib import Path

__version__ = "0.1.0"
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
