"""LoRA training speed against PEFT on one GPU: a thin wrapper of ``deltatune.benchmark`` (``deltatune bench``).

    python bench/bench_lora.py --shapes 1b,8b --longest 8192,16384,32768,65536 --json bench_lora.json
    python bench/bench_lora.py --shapes 1b --methods fast,peft --use-dora --json bench_dora.json  # DoRA beside LoRA
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from deltatune.benchmark import main  # noqa: E402

if __name__ == "__main__":
    main()
