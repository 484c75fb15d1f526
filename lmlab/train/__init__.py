"""Training: the one loop (loop.py), pretrain(), finetune(), memory prediction, LoRA merging, DDP setup."""
