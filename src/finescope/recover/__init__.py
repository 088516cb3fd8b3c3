"""Stage 3, recover: teacher-guided distillation (SDFT-style rewrites + filters) and LoRA fine-tuning with peft.

    finescope recover --student runs/demo/prune/model --data runs/demo/curate/selected.jsonl --out runs/demo/recover

Modules: rewrite.py (teacher generation), filters.py (rejection reasons, fallback), finetune.py (peft LoRA,
completion-only loss, merge), run.py (the stage entry point `run(cfg, out)`).
"""
