"""Synthetic visual tasks from the Qwen2-VL release's demos: generators, graders, an evaluation harness and a
training data source (for the demo model of issue 20).
"""
