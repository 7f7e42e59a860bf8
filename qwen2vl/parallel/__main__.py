"""``python -m qwen2vl.parallel PAYLOAD``: a tensor-parallel rank started by rank 0 (qwen2vl.parallel.launch)."""

import sys

from .launch import spawned_main

if __name__ == "__main__":
    spawned_main(sys.argv[1])
