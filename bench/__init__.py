"""The qwen2vl benchmark (``python bench/bench.py``); see bench/README.md."""
