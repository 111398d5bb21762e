"""Fine-tuning: parameter-group freezing, LoRA adapters (on attention, dense/shared FFNs and the routed
experts), adapter checkpoints over a base, merging, and the instruction-tuning benchmark.
See docs/finetune.md."""
