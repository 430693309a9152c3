"""papermill under `accelerate launch`: every process executes the notebook, the main one writes it where asked.

    accelerate launch --multi_gpu --num_processes N tools/papermill_ranks.py NOTEBOOK OUTPUT [papermill options]

Process k > 0 writes its executed copy beside OUTPUT as <name>.rank<k>.ipynb (its log of the same run), so no two
processes write one file. The kernels inherit accelerate's environment and join one process group.
"""
import os, sys
from pathlib import Path
from papermill.cli import papermill

if __name__ == "__main__":
    args, rank = sys.argv[1:], int(os.environ.get("RANK", "0"))
    if len(args) < 2 or args[0].startswith("-") or args[1].startswith("-"):
        sys.exit("usage: tools/papermill_ranks.py NOTEBOOK OUTPUT [papermill options]")
    output = Path(args[1])
    output.parent.mkdir(parents=True, exist_ok=True)  # papermill refuses an output folder that does not exist yet
    if rank: args[1] = str(output.with_name(f"{output.stem}.rank{rank}{output.suffix}"))
    papermill.main(args=args, prog_name="papermill")
