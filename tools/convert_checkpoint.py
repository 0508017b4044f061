"""Convert between Hugging Face and Megatron dist-checkpoints; see megatron_mel/convert/cli.py."""

import sys

from megatron_mel.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
