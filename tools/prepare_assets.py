"""Prepare the offline model and math data; see megatron_mel/assets.py (``main``)."""

import sys
from pathlib import Path

try:
    from megatron_mel.assets import main
except ModuleNotFoundError:
    # Running from a checkout before `pip install -e .`: make the repo root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from megatron_mel.assets import main

if __name__ == "__main__":
    sys.exit(main())
