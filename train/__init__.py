"""mm_train (the folder train/, installed under this name so that a user's train.py cannot shadow it): a thin
runtime over MM (MindSpeed-MM / Megatron) checkpoints of every family: TP x PP x EP forward equal to
transformers, greedy/sampled generation with a KV cache, ``check_logits`` and fine-tuning.

Modules: config (model description from HF or MM json), parallel (process groups, TP layers, stage p2p),
positions (window order, rotary, mrope), model (MM-named stage modules), checkpoint (strict shard loading),
runtime (pipelined step), inputs (chat template + image patches), generate, launch (local ranks),
check_logits, infer (``python -m mm_train.infer`` under torchrun).
"""
