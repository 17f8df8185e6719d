"""A thin Qwen2.5-VL runtime over MM (MindSpeed-MM / Megatron) checkpoints: TP x PP forward equal to
transformers, greedy/sampled generation with a KV cache, and ``check_logits``.

Modules: config (model description from HF or MM json), parallel (process groups, TP layers, stage p2p),
positions (window order, rotary, mrope), model (MM-named stage modules), checkpoint (strict shard loading),
runtime (pipelined step), inputs (chat template + image patches), generate, launch (local ranks),
check_logits, infer (``python -m train.infer`` under torchrun).
"""
